"""Shared test utilities: run the CLIs in a subprocess or in this process and check the one-line
error contract; golden files, dropped network paths, and tiny checkpoints in the released layouts."""

import contextlib
import copy
import functools
import http.server
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import threading

import pytest
import torch

import models
import sample
from conftest import ROOT, SPECS
from dnnlib.util import UserError
from models import adm
from models.discrete import scaled_linear_alphas_cumprod


def run_cli(script, *args, env=None, timeout=600, cwd=None):
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def run_here(command, *args, cwd=None):
    """A CLI's click command run in this process through dnnlib.run_cli, as the script runs it
    (skips the seconds of a fresh interpreter). Returns a CompletedProcess like run_cli's; an
    exception that run_cli lets through (a traceback, in a real run) fails the calling test."""
    import dnnlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:          # contextlib.chdir needs Python 3.11
            stack.callback(os.chdir, os.getcwd())
            os.chdir(cwd)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            dnnlib.run_cli(command, [str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(['run_here', *map(str, args)], code, out.getvalue(), err.getvalue())


def listing(folder):
    """Every path under `folder` (files and folders), relative, for 'nothing was written' checks."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder) for n in dirs + files)


def torchrun(script, nproc, *args, timeout=600, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def sample_one_and_two_processes(tmp_path, *args):
    """run.json of `sample.py *args` run as one process (folder one/) and under a 2-process
    torchrun (folder two/), both checked to succeed; and the one process's stdout."""
    records, stdout = [], None
    for name, run in (('one', lambda *a: run_cli('sample.py', *a)), ('two', lambda *a: torchrun('sample.py', 2, *a))):
        r = run(*args, f'--outdir={tmp_path / name}')
        assert r.returncode == 0, r.stderr
        records.append(json.loads((tmp_path / name / 'run.json').read_text()))
        stdout = stdout if stdout is not None else r.stdout
    return (*records, stdout)


def assert_one_line_error(result, flag):
    """Non-zero exit, stderr is exactly one line that starts with 'Error:' and names `flag`."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('Error:'), lines[0]
    assert flag in lines[0], lines[0]
    assert 'Traceback' not in result.stderr


# ----------------------------------------------------------------------------------------------
# Golden files and full-size specs (tests/data/specs).

def load_golden(name):
    return torch.load(os.path.join(SPECS, 'golden', f'{name}.pt'), weights_only=True)


def read_spec(name):
    """A full-size checkpoint spec and its {key: shape}."""
    with open(os.path.join(SPECS, f'{name}.json')) as f:
        spec = json.load(f)
    return spec, {k: tuple(s) for k, s, _ in spec['state_dict_keys']}


def golden_network(cls, kwargs, state_dict):
    """`cls(**kwargs)` in eval mode with the golden weights loaded strictly."""
    net = cls(**kwargs).eval()
    net.load_state_dict(state_dict, strict=True)
    return net


def drop_path(net, name):
    """Zero the output of every submodule called `name` (the last part of its dotted name), as
    if that path of the network were absent: e.g. 'emb_layers' drops the timestep embedding of
    every ResBlock, 'proj_out' the attention. Returns net."""
    hit = [m for n, m in net.named_modules() if n.rsplit('.', 1)[-1] == name]
    assert hit, f'no submodule named {name}'
    for m in hit:
        m.register_forward_hook(lambda module, inputs, out: torch.zeros_like(out))
    return net


def assert_golden_misses(out, ref, atol, rtol=0.0):
    """The golden comparison fails, and by far (100 times its tolerance): the golden file sees
    the path that was dropped."""
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    assert (out - ref).abs().max() > 100 * (atol + rtol * ref.abs().max())


def assert_full_size_layout(spec_name, cls, kwargs, inferred):
    """The full config `cls(**kwargs)` has exactly the released file's keys, shapes and size; the
    config inferred from those shapes builds the same network; and the loader's own path
    (models.adm.build_network: meta device + assign) takes the state dict without copying it, so
    the gigabytes of torch.empty storage are never written."""
    spec, shapes = read_spec(spec_name)
    with torch.device('meta'):
        net, again = cls(**kwargs), cls(**inferred)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes
    assert sum(v.numel() for v in net.state_dict().values()) == spec['num_parameters_and_buffers']
    assert repr(again) == repr(net)
    sd = {k: torch.empty(s) for k, s in shapes.items()}
    loaded = adm.build_network(cls, inferred, sd, spec['checkpoint'])
    assert all(p.data_ptr() == sd[k].data_ptr() for k, p in loaded.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Loading tiny checkpoints in the released layouts.

def weight_files(folder, **state_dicts):
    """Each state dict saved as <name>.pt in folder, plus garbage.pt: a download that went wrong
    (an HTML error page, not a weights file). Returns folder."""
    for name, sd in state_dicts.items():
        torch.save(sd, folder / f'{name}.pt')
    (folder / 'garbage.pt').write_bytes(b'<html>404</html>')
    return folder


def assert_load_fails(dataset_name, error, **kwargs):
    """models.load refuses: a UserError of one line whose start matches the regex `error` (the
    flag, and what it says about it)."""
    with pytest.raises(UserError) as e:
        models.load(dataset_name, device='cpu', **kwargs)
    assert re.match(error, str(e.value)) and '\n' not in str(e.value), str(e.value)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_folder(folder):
    """A local HTTP server of folder's files; yields its base URL (ending in '/')."""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    finally:
        httpd.shutdown()
        httpd.server_close()


class FakeModelCheckpoint:
    """Stands for pytorch_lightning's callback class: Lightning 1.x keys the checkpoint's
    'callbacks' dict by the callback *class*, which weights_only loading does not allow."""

    def __init__(self):
        self.best_model_path = pathlib.PurePosixPath('/logs/last.ckpt')


def write_lightning_ckpt(path, state_dict):
    torch.save({
        'epoch': 7, 'global_step': 123456, 'pytorch-lightning_version': '1.4.2', 'state_dict': state_dict,
        'callbacks': {FakeModelCheckpoint: {'best_model_score': torch.tensor(0.1),
                                            'best_model_path': pathlib.PurePosixPath('/logs/last.ckpt')}},
        'optimizer_states': [{'state': {}, 'param_groups': [{'lr': 2e-6, 'params': [0, 1]}]}],
        'lr_schedulers': [], 'hparams': FakeModelCheckpoint(),
    }, path)


def write_config(path, cfg):
    from omegaconf import OmegaConf
    OmegaConf.save(OmegaConf.create(cfg), path)


def small_release_config(builtin_config, golden, first_stage_key):
    """A latent-diffusion model's built-in config with the small golden UNet and first stage in
    it (their constructor arguments as the config's params), on 8x8 latents."""
    cfg = copy.deepcopy(builtin_config)
    p = cfg['model']['params']
    p['image_size'] = 8
    p['unet_config']['params'] = dict(golden['config']['unet_constructor_kwargs'])
    p['first_stage_config']['params'] = dict(golden['config'][first_stage_key])
    return cfg


def write_release(folder, state_dict, config):
    """The files of a latent-diffusion release: model.ckpt (Lightning) and config.yaml."""
    write_lightning_ckpt(folder / 'model.ckpt', state_dict)
    write_config(folder / 'config.yaml', config)


DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'int32': torch.int32, 'int64': torch.int64}


def spec_state_dict(spec):
    """Uninitialised tensors with exactly the spec's keys, shapes and dtypes (memory is only
    reserved, never touched), plus the true schedule the loader checks against its config."""
    sd = {k: torch.empty(shape, dtype=DTYPES[dtype]) for k, shape, dtype in spec['state_dict_keys']}
    p = spec['model_config']['params']
    sd['alphas_cumprod'] = torch.tensor(scaled_linear_alphas_cumprod(p['linear_start'], p['linear_end']),
                                        dtype=torch.float32)
    return sd


# ----------------------------------------------------------------------------------------------
# sample.py in-process.

def check_images(outdir, n):
    """outdir holds the images of seeds 0..n-1, all different; returns its run.json record."""
    pngs = sorted(p for p in os.listdir(outdir) if p.endswith('.png'))
    assert pngs == [f'{s:06d}.png' for s in range(n)]
    assert len({open(os.path.join(outdir, p), 'rb').read() for p in pngs}) == n    # one image per seed
    with open(os.path.join(outdir, 'run.json')) as f:
        return json.load(f)


def sample_images(outdir, n, *args):
    """sample.py's click command in-process with `args` and --outdir, then check_images."""
    sample.main.main(args=[*map(str, args), f'--outdir={outdir}'], standalone_mode=False)
    return check_images(outdir, n)
