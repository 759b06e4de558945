"""EDM checkpoints: our network classes against the golden outputs and the full-size key layouts,
and the loader end to end on small snapshot pickles written in the released format (a dict with
'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs', numpy 1.x references), served by file:// and
by a local HTTP server, through models.load and through sample.py."""

import functools
import http.server
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import dnnlib
import models
import solvers
from conftest import ROOT, SPECS
from dnnlib.util import UserError
from helpers import assert_golden_misses, drop_path
from models import edm, edm_networks
from torch_utils import misc

GOLDEN = os.path.join(SPECS, 'golden')
SPEC_NAMES = {'cifar10': 'edm-cifar10-32x32-uncond-vp', 'ffhq': 'edm-ffhq-64x64-uncond-vp',
              'afhqv2': 'edm-afhqv2-64x64-uncond-vp', 'imagenet64': 'edm-imagenet-64x64-cond-adm'}


@pytest.fixture(autouse=True)
def one_thread():
    """The toy networks here are too small to gain from intra-op threads, and under a busy CI
    machine the threads' synchronisation makes them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_spec(dataset_name):
    with open(os.path.join(SPECS, SPEC_NAMES[dataset_name] + '.json')) as f:
        return json.load(f)


def build(config, **overrides):
    """An edm_networks preconditioner from a config in EDM's `network_kwargs` form."""
    kw = dict(config, **overrides)
    cls = getattr(edm_networks, kw.pop('class_name').rsplit('.', 1)[-1])
    kw = {k: (float(v) if v == 'inf' else v) for k, v in kw.items()}
    return cls(**kw)


# ----------------------------------------------------------------------------------------------
# Golden outputs. The reference ran on CPU in float32; our classes perform the same operations in
# the same order, so agreement is expected to rounding level. The README of specs/ suggests
# atol = rtol = 1e-4 for a from-scratch implementation (op-order differences ~1e-5 relative);
# the outputs here are O(1)..O(10), so 1e-4 is ~1e-5 relative: far below any real mistake (a
# wrong layer changes outputs at O(1e-1)), and above BLAS-dependent rounding.
TOL = dict(atol=1e-4, rtol=1e-4)


def test_golden_vpprecond_songunet():
    g = torch.load(os.path.join(GOLDEN, 'edm_songunet_vp.pt'), weights_only=True)
    net = build(g['config']).eval()
    net.load_state_dict(g['state_dict'], strict=True)
    with torch.no_grad():
        c_skip, c_out, c_in, c_noise = net.coefficients(g['sigma'].reshape(-1, 1, 1, 1))
        F = net.model(g['net_input'], g['c_noise'], None)
        F_aug = net.model(g['net_input'], g['c_noise'], None, augment_labels=g['augment_labels'])
        D = net(g['x'], g['sigma'])
    torch.testing.assert_close(c_in.flatten(), g['c_in'], **TOL)
    torch.testing.assert_close(c_noise.flatten(), g['c_noise'], **TOL)
    torch.testing.assert_close(F, g['raw_net_output'], **TOL)
    torch.testing.assert_close(F_aug, g['raw_net_output_with_augment'], **TOL)
    torch.testing.assert_close(D, g['denoised'], **TOL)
    assert net.sigma_min == pytest.approx(0.0009765625) and net.sigma_max == pytest.approx(152.16697692871094)


# Each path of the networks matters to the golden outputs (the regenerated SongUNet file has no
# near-zero weights left): the noise embedding, its addition in every block ('affine'), the
# attention, the augment labels (SongUNet) and the class labels (DhariwalUNet).
@pytest.mark.parametrize('name,path,labels,output', [
    ('edm_songunet_vp', 'map_noise', None, 'raw_net_output'),
    ('edm_songunet_vp', 'affine', None, 'raw_net_output'),
    ('edm_songunet_vp', 'proj', None, 'raw_net_output'),
    ('edm_songunet_vp', 'map_augment', 'augment_labels', 'raw_net_output_with_augment'),
    ('edm_dhariwalunet_edmprecond_cond', 'map_noise', None, 'raw_net_output'),
    ('edm_dhariwalunet_edmprecond_cond', 'affine', None, 'raw_net_output'),
    ('edm_dhariwalunet_edmprecond_cond', 'proj', None, 'raw_net_output'),
    ('edm_dhariwalunet_edmprecond_cond', 'map_label', None, 'raw_net_output'),
])
def test_golden_fails_without(name, path, labels, output):
    g = torch.load(os.path.join(GOLDEN, f'{name}.pt'), weights_only=True)
    net = build(g['config']).eval()
    net.load_state_dict({k: v.float() for k, v in g['state_dict'].items()}, strict=True)
    drop_path(net, path)
    with torch.no_grad():
        F = net.model(g['net_input'], g['c_noise'], g.get('class_labels'), augment_labels=g.get(labels))
    assert_golden_misses(F, g[output], **TOL)


def test_golden_edmprecond_dhariwalunet_conditional():
    g = torch.load(os.path.join(GOLDEN, 'edm_dhariwalunet_edmprecond_cond.pt'), weights_only=True)
    net = build(g['config']).eval()
    # Stored as float16 for size; the values are exactly the float32 weights used.
    net.load_state_dict({k: v.float() for k, v in g['state_dict'].items()}, strict=True)
    with torch.no_grad():
        c_skip, c_out, c_in, c_noise = net.coefficients(g['sigma'].reshape(-1, 1, 1, 1))
        F = net.model(g['net_input'], g['c_noise'], g['class_labels'])
        D = net(g['x'], g['sigma'], g['class_labels'])
        other = torch.nn.functional.one_hot((g['class_index'] + 1) % 10, 10).float()
        D_other = net(g['x'], g['sigma'], other)
    torch.testing.assert_close(c_in.flatten(), g['c_in'], **TOL)
    torch.testing.assert_close(c_noise.flatten(), g['c_noise'], **TOL)
    torch.testing.assert_close(F, g['raw_net_output'], **TOL)
    torch.testing.assert_close(D, g['denoised'], **TOL)
    assert (D_other - g['denoised']).abs().max() > 1e3 * TOL['atol']    # the label matters
    # The 64-channel 8x8 blocks have one attention head; the 32-channel 16x16 ones have none.
    assert net.model.enc['8x8_block0'].num_heads == 1 and net.model.enc['16x16_block0'].num_heads == 0


@pytest.mark.parametrize('dataset_name', list(SPEC_NAMES))
def test_full_size_config_matches_released_key_layout(dataset_name):
    spec = read_spec(dataset_name)
    with torch.device('meta'):          # no memory, no init: only the module tree and shapes
        net = build(spec['network_kwargs'])
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ref = {k: tuple(shape) for k, shape, dtype in spec['state_dict_keys']}
    assert sorted(ours) == sorted(ref)
    assert ours == ref
    assert sum(int(np.prod(s)) for s in ours.values()) == spec['num_parameters_and_buffers']
    # A state dict with exactly the released names and shapes loads strictly (random values).
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) for k, shape in ref.items()}
    net.load_state_dict(state, strict=True, assign=True)
    for key in ('model.map_layer0.weight', 'model.enc.' + next(iter(net.model.enc)) + '.weight'):
        assert torch.equal(net.state_dict()[key], state[key])
    attrs = spec['preconditioner_resolved_attributes']
    assert (net.img_resolution, net.img_channels, net.label_dim) == (attrs['img_resolution'], attrs['img_channels'], attrs['label_dim'])
    assert net.sigma_min == 0 and net.sigma_max == float('inf') and net.sigma_data == 0.5


# ----------------------------------------------------------------------------------------------
# Snapshot pickles in the released layout.

# Stand-ins for EDM's loss and augmentation pipe, defined in a module that only this process can
# import, so loading them exercises the embedded-source path (as the real training/loss.py and
# training/augment.py, which import torch_utils.persistence and torch_utils.misc).
TRAINING_SRC = textwrap.dedent('''
    import numpy as np
    import torch
    from torch_utils import misc, persistence

    @persistence.persistent_class
    class EDMLoss:
        def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
            self.P_mean = P_mean
            self.P_std = P_std
            self.sigma_data = sigma_data

    @persistence.persistent_class
    class AugmentPipe:
        def __init__(self, p=1, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0):
            self.p = float(p)
            self.xflip = float(xflip)
            self.scale = float(scale)
            self.scale_std = np.float64(0.2)
''')

TINY = dict(img_resolution=8, model_channels=16, num_blocks=1, attn_resolutions=[4], dropout=0.0)


def tiny_network(dataset_name, seed=0):
    """The released config at toy size, every parameter perturbed so that all of them (also the
    zero-initialised output layers) influence the output."""
    torch.manual_seed(seed)
    net = build(read_spec(dataset_name)['network_kwargs'], **TINY)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


def numpy1_references(data):
    """Rename numpy 2's `numpy._core` globals to numpy 1.x's `numpy.core`, as in the released files
    (protocol 2 spells a global as 'c<module>\\n<name>\\n', so a byte replacement is exact)."""
    assert b'cnumpy._core.multiarray\nscalar\n' in data
    return data.replace(b'cnumpy._core.', b'cnumpy.core.')


def snapshot_bytes(net, training, ema_key='ema'):
    data = {ema_key: net, 'loss_fn': training.EDMLoss(), 'augment_pipe': training.AugmentPipe(p=0.12, xflip=1e8),
            'dataset_kwargs': dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset',
                                              path='datasets/tiny.zip', use_labels=net.label_dim > 0,
                                              xflip=False, cache=True, resolution=8, max_size=100)}
    return numpy1_references(pickle.dumps(data, protocol=2))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Served folder with good and bad checkpoints, and the networks they hold."""
    folder = tmp_path_factory.mktemp('served')
    src = tmp_path_factory.mktemp('training_src')
    (src / 'edm_test_training.py').write_text(TRAINING_SRC)
    sys.path.insert(0, str(src))
    try:
        import edm_test_training as training
    finally:
        sys.path.remove(str(src))
    nets = dict(cifar10=tiny_network('cifar10', 0), imagenet64=tiny_network('imagenet64', 1))
    blobs = {'cifar10.pkl': snapshot_bytes(nets['cifar10'], training),
             'imagenet64.pkl': snapshot_bytes(nets['imagenet64'], training)}
    blobs['truncated.pkl'] = blobs['cifar10.pkl'][:len(blobs['cifar10.pkl']) // 2]
    blobs['text.pkl'] = b'<html>404 Not Found</html>\n'
    blobs['no_ema.pkl'] = snapshot_bytes(nets['cifar10'], training, ema_key='network')
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    sys.modules.pop('edm_test_training', None)
    return dnnlib.EasyDict(folder=folder, nets=nets, blobs=blobs)


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        return super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server(files):
    handler = functools.partial(_Handler, directory=str(files.folder))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f'http://127.0.0.1:{httpd.server_address[1]}/'
    yield dnnlib.EasyDict(url=lambda name: base + name, hits=_Handler.hits)
    httpd.shutdown()
    httpd.server_close()


def hits(server, name):
    return sum(1 for p in server.hits if p == '/' + name)


def check_same_denoiser(model, net, label=None):
    x = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution, generator=torch.Generator().manual_seed(5))
    labels = None if label is None else model.conditioning([0, 1], torch.tensor(label))['class_labels']
    for sigma in (0.002, 1.3, 80.0):
        with torch.no_grad():
            ref = net(x, torch.full([2], sigma, dtype=torch.float64), labels)
        assert torch.equal(model.denoise(x, sigma, class_labels=labels), ref)


def test_default_download_lands_in_src_and_is_reused(tmp_path, monkeypatch, files, server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(edm.URLS, 'cifar10', server.url('cifar10.pkl'))
    model = models.load('cifar10')
    cached = tmp_path / 'src' / 'cifar10' / 'cifar10.pkl'
    assert cached.read_bytes() == files.blobs['cifar10.pkl']
    assert sorted(os.listdir(cached.parent)) == ['cifar10.pkl']        # no temporary files left
    assert hits(server, 'cifar10.pkl') == 1
    again = models.load('cifar10')
    assert hits(server, 'cifar10.pkl') == 1                             # second load: no network
    for m in (model, again):
        assert (m.img_channels, m.img_resolution, m.label_dim, m.shape) == (3, 8, 0, (3, 8, 8))
        # EDMPrecond carries sigma_min=0, sigma_max=inf: EDM's sampling range applies.
        assert (m.sigma_min, m.sigma_max) == (0.002, 80.0)
        assert not m.use_fp16 and not m.net.use_fp16
        check_same_denoiser(m, files.nets['cifar10'])


def test_model_path_url_file_url_and_local_path(tmp_path, monkeypatch, files, server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(edm.URLS, 'ffhq', server.url('never-used.pkl'))
    m = models.load('ffhq', model_path=server.url('cifar10.pkl'))
    assert (tmp_path / 'src' / 'ffhq' / 'cifar10.pkl').read_bytes() == files.blobs['cifar10.pkl']
    check_same_denoiser(m, files.nets['cifar10'])
    path = files.folder / 'cifar10.pkl'
    for source in (path.as_uri(), str(path)):       # used in place, nothing copied
        check_same_denoiser(models.load('afhqv2', model_path=source), files.nets['cifar10'])
    assert not (tmp_path / 'src' / 'afhqv2').exists()
    assert hits(server, 'never-used.pkl') == 0


def test_imagenet64_is_class_conditional(files):
    model = models.load('imagenet64', model_path=str(files.folder / 'imagenet64.pkl'))
    assert model.label_dim == 1000 and (model.sigma_min, model.sigma_max) == (0.002, 80.0)
    cond = model.conditioning([3, 4], torch.tensor([7, 999]))
    labels = cond['class_labels']
    assert labels.dtype == torch.float32 and labels.shape == (2, 1000)
    assert labels.sum(1).tolist() == [1, 1] and labels[0, 7] == 1 and labels[1, 999] == 1
    check_same_denoiser(model, files.nets['imagenet64'], label=[7, 999])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = model.bind(**cond)(x, 2.0)
    b = model.bind(**model.conditioning([3, 4], torch.tensor([8, 0])))(x, 2.0)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3            # each row depends on its label


def test_sigma_range_is_the_networks_own_within_edm_defaults():
    torch.manual_seed(0)
    vp = build(dict(class_name='VPPrecond', img_channels=3, model_type='SongUNet', **TINY))
    m = edm.EDMModel(vp)
    assert vp.sigma_min < 0.002 and vp.sigma_max > 80
    assert (m.sigma_min, m.sigma_max) == (0.002, 80.0)
    narrow = build(dict(class_name='VPPrecond', img_channels=3, model_type='SongUNet',
                        beta_d=5.0, epsilon_t=0.01, **TINY))
    m = edm.EDMModel(narrow)
    assert 0.002 < m.sigma_min == narrow.sigma_min and m.sigma_max == narrow.sigma_max < 80
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():      # a 0-dim sigma, a float and a per-row tensor give the same result
        ref = narrow(x, torch.full([3], 1.5))
    for sigma in (1.5, torch.tensor(1.5), torch.full([3], 1.5)):
        assert torch.equal(m.denoise(x, sigma), ref)


def test_use_fp16_on_cpu_is_refused_before_any_download(tmp_path, monkeypatch, server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(edm.URLS, 'cifar10', server.url('cifar10.pkl'))
    before = hits(server, 'cifar10.pkl')
    with pytest.raises(UserError, match='--use_fp16: half precision needs a CUDA device'):
        models.load('cifar10', device='cpu', use_fp16=True)
    assert hits(server, 'cifar10.pkl') == before and not (tmp_path / 'src').exists()
    assert edm.resolve_fp16(None, torch.device('cpu')) is False
    assert edm.resolve_fp16(None, torch.device('cuda', 0)) is True
    assert edm.resolve_fp16(None, torch.device('cuda', 0), default=False) is False   # DDPM++ pickles
    assert edm.resolve_fp16(False, torch.device('cuda', 0)) is False


def test_options_of_other_model_families_are_refused(files):
    with pytest.raises(UserError, match='--guidance_type'):
        models.load('cifar10', model_path=str(files.folder / 'cifar10.pkl'), guidance_type='cg')


def test_failed_download_says_where_and_what_to_do(tmp_path, monkeypatch, server):
    monkeypatch.chdir(tmp_path)
    url = server.url('missing/edm-cifar10-32x32-uncond-vp.pkl')
    monkeypatch.setitem(edm.URLS, 'cifar10', url)
    with pytest.raises(UserError) as e:
        models.load('cifar10')
    msg = str(e.value)
    assert url in msg and os.path.join('src', 'cifar10', 'edm-cifar10-32x32-uncond-vp.pkl') in msg
    assert '--model_path' in msg and 'Offline' in msg and '\n' not in msg
    assert os.listdir(tmp_path) == []       # nothing half-written left, not even an empty src/cifar10/


def test_invalid_cached_download_is_moved_aside_then_fetched_again(tmp_path, monkeypatch, files, server):
    monkeypatch.chdir(tmp_path)
    (files.folder / 'flaky.pkl').write_bytes(files.blobs['truncated.pkl'])
    monkeypatch.setitem(edm.URLS, 'cifar10', server.url('flaky.pkl'))
    with pytest.raises(UserError) as e:
        models.load('cifar10')
    cached = tmp_path / 'src' / 'cifar10' / 'flaky.pkl'
    assert 'ends early' in str(e.value) and str(cached) + '.invalid' in str(e.value)
    assert not cached.exists() and (tmp_path / 'src' / 'cifar10' / 'flaky.pkl.invalid').exists()
    (files.folder / 'flaky.pkl').write_bytes(files.blobs['cifar10.pkl'])     # the server is fixed
    check_same_denoiser(models.load('cifar10'), files.nets['cifar10'])
    assert hits(server, 'flaky.pkl') == 2


@pytest.mark.parametrize('name, reason', [('truncated.pkl', 'ends early'), ('text.pkl', 'not a Python pickle'),
                                          ('no_ema.pkl', 'key "ema"')])
def test_bad_local_file_in_process(files, name, reason):
    path = files.folder / name
    with pytest.raises(UserError, match=reason) as e:
        models.load('cifar10', model_path=str(path))
    assert str(e.value).startswith('--model_path: ')
    assert path.read_bytes() == files.blobs[name]                     # a user's file is never touched


def test_torch_save_file_is_named_as_such(tmp_path):
    path = tmp_path / 'weights.pt'
    torch.save({'ema': {'w': torch.zeros(2)}}, path)
    with pytest.raises(UserError, match='zip archive'):
        models.load('cifar10', model_path=str(path))


# ----------------------------------------------------------------------------------------------
# sample.py end to end (subprocesses: each run starts from a fresh interpreter, as a user's does).

def run_sample(cwd, *args):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('Error: '), r.stderr
    assert 'Traceback' not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def images(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith('.png'):
            out[name] = np.asarray(Image.open(os.path.join(folder, name)))
    return out


SMALL = ['--seeds=0-2', '--batch=2', '--num_steps=4']


def test_sample_cli_downloads_once_and_runs_gits(tmp_path, files, server):
    url = server.url('cifar10.pkl')
    before = hits(server, 'cifar10.pkl')
    runs = {'euler': ['--solver=euler'], 'heun': ['--solver=heun'],
            'gits': ['--solver=euler', '--dp=True', '--num_warmup=4', '--num_steps_tea=9', '--solver_tea=euler']}
    for name, flags in runs.items():
        r = run_sample(tmp_path, '--dataset_name=cifar10', f'--model_path={url}', f'--outdir=out/{name}', *SMALL, *flags)
        assert r.returncode == 0, r.stderr
        record = json.loads((tmp_path / 'out' / name / 'run.json').read_text())
        t = record['t_steps']
        assert len(t) == 4 and t[0] == pytest.approx(80.0) and t[-1] == pytest.approx(0.002)
        imgs = images(tmp_path / 'out' / name)
        assert sorted(imgs) == ['000000.png', '000001.png', '000002.png']
        assert all(a.shape == (8, 8, 3) and a.dtype == np.uint8 for a in imgs.values())
        assert not np.array_equal(imgs['000000.png'], imgs['000001.png'])
    assert (tmp_path / 'src' / 'cifar10' / 'cifar10.pkl').read_bytes() == files.blobs['cifar10.pkl']
    assert hits(server, 'cifar10.pkl') == before + 1               # downloaded by the first run only
    # GITS searched a schedule of its own (not the polynomial one euler used).
    plain = json.loads((tmp_path / 'out' / 'euler' / 'run.json').read_text())['t_steps']
    searched = json.loads((tmp_path / 'out' / 'gits' / 'run.json').read_text())
    assert searched['search'] is not None and searched['t_steps'] != plain


@pytest.mark.parametrize('solver', sorted(set(solvers.SOLVERS) - {'euler', 'heun'}))
def test_sample_other_registered_solvers_in_process(tmp_path, files, solver):
    """Every other solver registered now, through sample.py's command in this process (the
    subprocess runs above already cover the fresh-interpreter path)."""
    import sample
    out = tmp_path / 'out'
    sample.main.main(args=['--dataset_name=cifar10', f'--model_path={(files.folder / "cifar10.pkl").as_uri()}',
                           f'--outdir={out}', f'--solver={solver}', *SMALL], standalone_mode=False)
    assert sorted(images(out)) == ['000000.png', '000001.png', '000002.png']


def test_sample_cli_imagenet64_labels_per_seed_and_class_idx(tmp_path, files):
    path = files.folder / 'imagenet64.pkl'
    common = ['--dataset_name=imagenet64', f'--model_path={path}', '--solver=euler', '--seeds=0-1', '--num_steps=4']
    drawn = []
    for s in (0, 1):      # the label sample.py draws for a seed: after the seed's noise
        g = misc.seed_generator(s)
        torch.randn([3, 8, 8], generator=g, dtype=torch.float64)
        drawn.append(int(torch.randint(1000, [1], generator=g)))
    fixed = next(k for k in range(1000) if k not in drawn)
    assert run_sample(tmp_path, *common, '--outdir=per_seed').returncode == 0
    r = run_sample(tmp_path, *common, '--outdir=fixed', f'--class_idx={fixed}')
    assert r.returncode == 0, r.stderr
    per_seed, forced = images(tmp_path / 'per_seed'), images(tmp_path / 'fixed')
    assert sorted(per_seed) == sorted(forced) == ['000000.png', '000001.png']
    assert all(not np.array_equal(per_seed[k], forced[k]) for k in per_seed)


@pytest.mark.parametrize('name', ['truncated.pkl', 'text.pkl', 'no_ema.pkl'])
def test_sample_cli_bad_file_is_one_line(tmp_path, files, name):
    r = run_sample(tmp_path, '--dataset_name=cifar10', f'--model_path={files.folder / name}', '--solver=euler',
                   '--seeds=0', '--outdir=out')
    assert_one_line_error(r, '--model_path', str(files.folder / name), 'not a valid EDM checkpoint')
    assert r.returncode == 2 and not (tmp_path / 'out').exists()


def test_torchrun_downloads_once_on_rank0(tmp_path, files, server):
    """Two processes: rank 0 downloads while rank 1 waits, then both read the cached file."""
    (files.folder / 'ranks.pkl').write_bytes(files.blobs['cifar10.pkl'])
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'sample.py'), '--dataset_name=cifar10', f'--model_path={server.url("ranks.pkl")}',
           '--outdir=out', '--solver=euler', '--seeds=0-3', '--batch=2', '--num_steps=4', '--device=cpu']
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(images(tmp_path / 'out')) == [f'{s:06d}.png' for s in range(4)]
    assert hits(server, 'ranks.pkl') == 1
    assert sorted(os.listdir(tmp_path / 'src' / 'cifar10')) == ['ranks.pkl']
