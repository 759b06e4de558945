"""lsun_bedroom (consistency-models EDM network): golden outputs of the reference network and
denoiser, the full-size layout, the float16 file format, loading and sampling end to end."""

import math
import os

import pytest
import torch

import models
import solvers
from dnnlib.util import UserError
from helpers import (assert_full_size_layout, assert_golden_misses, assert_load_fails, assert_one_line_error,
                     drop_path, golden_network, load_golden, read_spec, run_cli, sample_images, serve_folder,
                     weight_files)
from models import adm, cm, unet, unet_config

# Same tolerance argument as tests/test_adm.py: float32 round-off of O(1) outputs.
ATOL = 1e-5
CM_OPTIONS = dict(use_scale_shift_norm=False, resblock_updown=True, attention_type='flash', attention_dims=2)


@pytest.fixture(scope='module')
def gold():
    g = load_golden('cm_unet_edm')
    kwargs = {k: v for k, v in g['config']['resolved_constructor_kwargs'].items() if k != 'dtype_attr'}
    g['kwargs'] = dict(kwargs, **CM_OPTIONS)
    return g


def golden_net(g, **overrides):
    return golden_network(unet.UNetModel, dict(g['kwargs'], **overrides), g['state_dict'])


@torch.no_grad()
def unet_output(net, g):
    return net(g['net_input'], g['rescaled_t'])


def test_golden_unet_and_denoiser(gold):
    net = golden_net(gold)
    torch.testing.assert_close(unet_output(net, gold), gold['model_output'], atol=ATOL, rtol=0)
    # The wrapper: EDM scalings with sigma_data 0.5 and time input 250 ln(sigma + 1e-44), one
    # noise level per call, so each golden row is checked on its own.
    model = cm.CMEDMModel(net)
    for i, sigma in enumerate(gold['sigma'].tolist()):
        c_skip, c_out, c_in = model.scalings(sigma)
        torch.testing.assert_close(torch.tensor([c_skip, c_out, c_in], dtype=torch.float32),
                                   torch.stack([gold['c_skip'][i], gold['c_out'][i], gold['c_in'][i]]))
        assert 250 * math.log(sigma + 1e-44) == pytest.approx(float(gold['rescaled_t'][i]), rel=1e-6)
        with torch.no_grad():
            d = model.denoise(gold['x'][i:i + 1], sigma)
        torch.testing.assert_close(d, gold['denoised'][i:i + 1], atol=ATOL, rtol=0)


def test_golden_detects_legacy_layout_and_conv1d(gold):
    net = golden_net(gold, attention_type='legacy')
    assert (unet_output(net, gold) - gold['model_output']).abs().max() > 1000 * ATOL
    with pytest.raises(RuntimeError):       # guided-diffusion's 1-d attention convs do not fit the file
        golden_net(gold, attention_dims=1)


@pytest.mark.parametrize('path', ['emb_layers', 'proj_out'])
def test_golden_fails_without(gold, path):
    """The timestep embedding of every ResBlock and the attention blocks matter to the golden output
    (with 64 channels: the earlier 32-channel file's GroupNorm32 removed the embedding)."""
    assert_golden_misses(unet_output(drop_path(golden_net(gold), path), gold), gold['model_output'], atol=ATOL)


def test_infer_config_from_golden(gold):
    cfg = unet_config.infer_unet_config(gold['state_dict'], num_head_channels=16, attention_type='flash')
    ref = gold['kwargs']
    for key in ('model_channels', 'out_channels', 'num_res_blocks', 'attention_resolutions', 'channel_mult',
                'num_classes', 'use_scale_shift_norm', 'resblock_updown', 'attention_dims'):
        assert cfg[key] == ref[key], key


def test_full_size_layout():
    spec, shapes = read_spec('cm-edm_bedroom256_ema')
    kwargs = {k: v for k, v in spec['constructor_kwargs'].items() if k != 'dtype_attr'}
    inferred = unet_config.infer_unet_config(shapes, attention_type='flash')
    inferred['image_size'] = adm.image_size_from_attention(inferred)
    assert inferred['image_size'] == 256 and inferred['num_classes'] is None
    assert_full_size_layout('cm-edm_bedroom256_ema', unet.UNetModel, dict(kwargs, **CM_OPTIONS), inferred)


# ----------------------------------------------------------------------------------------------
# A tiny network of the same family, saved like the release (flat state dict, float16 values).

def tiny_cm(seed=0):
    torch.manual_seed(seed)
    return unet.UNetModel(image_size=32, model_channels=64, out_channels=3, num_res_blocks=1,
                              attention_resolutions=(1, 2), channel_mult=(1, 1), num_head_channels=64,
                              **CM_OPTIONS).eval()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    adm_like = {k: v for k, v in tiny_cm().state_dict().items()}
    adm_like['label_emb.weight'] = torch.zeros(10, 256)      # an unexpected key for this network
    adm_like.pop('out.2.bias')
    released = {k: v.half() for k, v in tiny_cm().state_dict().items()}
    return weight_files(tmp_path_factory.mktemp('cm'), tiny_cm=released, broken=adm_like)


def test_fp16_file_is_upcast_and_computes_the_same_function(files):
    model = models.load('lsun_bedroom', model_path=str(files / 'tiny_cm.pt'))
    assert (model.sigma_min, model.sigma_max, model.label_dim, model.shape) == (0.002, 80.0, 0, (3, 32, 32))
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    ref = tiny_cm()
    ref.load_state_dict({k: v.half().float() for k, v in ref.state_dict().items()})
    assert all(torch.equal(p, ref.state_dict()[k]) for k, p in model.net.state_dict().items())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2
    sigma = 2.0
    with torch.no_grad():
        expect = 0.25 / 4.25 * x + (2 * 0.5 / 4.25 ** 0.5) * ref(x / 4.25 ** 0.5, torch.full([2], 250 * math.log(2.0)))
        torch.testing.assert_close(model.denoise(x, sigma), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize('kwargs,flag', [
    (dict(guidance_type='cg'), '--guidance_type'),
    (dict(guidance_rate=2.0), '--guidance_rate'),
    (dict(prompt='a bed'), '--prompt'),
    (dict(use_fp16=True), '--use_fp16'),
    (dict(model_path='garbage.pt'), '--model_path'),
    (dict(model_path='broken.pt'), '--model_path'),
    (dict(model_path='missing.pt'), '--model_path'),
])
def test_bad_options_and_files_are_one_line_user_errors(files, kwargs, flag):
    kwargs = dict(kwargs, model_path=str(files / kwargs.get('model_path', 'tiny_cm.pt')))
    assert_load_fails('lsun_bedroom', flag, **kwargs)


def test_download_into_src_cache(tmp_path, monkeypatch, files):
    with serve_folder(files) as base:
        monkeypatch.chdir(tmp_path)
        # The default download failing: the message does not blame --model_path, which was not
        # given (it names it as the offline way out), and no empty ./src/lsun_bedroom/ is left.
        monkeypatch.setattr(cm, 'MODEL_URL', base + 'nothing.pt')
        with pytest.raises(UserError) as e:
            models.load('lsun_bedroom')
        assert str(e.value).startswith('download of ') and 'pass its local path with --model_path' in str(e.value)
        assert not (tmp_path / 'src').exists()
        monkeypatch.setattr(cm, 'MODEL_URL', base + 'tiny_cm.pt')
        model = models.load('lsun_bedroom')
        assert os.listdir(tmp_path / 'src' / 'lsun_bedroom') == ['tiny_cm.pt']
        assert model.img_resolution == 32
        with pytest.raises(UserError, match='--model_path: download of .*nothing.pt failed'):
            models.load('lsun_bedroom', model_path=base + 'nothing.pt')
        assert os.listdir(tmp_path / 'src' / 'lsun_bedroom') == ['tiny_cm.pt']     # no partial file


# ----------------------------------------------------------------------------------------------
# sample.py end to end.

@pytest.mark.parametrize('solver', sorted(solvers.SOLVERS))
def test_sample_every_solver(files, tmp_path, solver):
    record = sample_images(tmp_path / solver, 2, '--dataset_name=lsun_bedroom', f'--model_path={files / "tiny_cm.pt"}',
                           '--seeds=0-1', '--batch=2', f'--solver={solver}', '--num_steps=3')
    assert record['t_steps'][0] == 80.0


def test_sample_gits(files, tmp_path):
    record = sample_images(tmp_path / 'gits', 2, '--dataset_name=lsun_bedroom', f'--model_path={files / "tiny_cm.pt"}',
                           '--seeds=0-1', '--batch=4', '--solver=euler', '--num_steps=4', '--dp=True',
                           '--num_warmup=4', '--num_steps_tea=9', '--solver_tea=euler')
    assert len(record['t_steps']) == 4 and record['t_steps'][0] == 80.0
    assert record['t_steps'][-1] == pytest.approx(0.002)


def test_sample_cli_and_discrete_schedule_error(files, tmp_path):
    out = tmp_path / 'cli'
    r = run_cli('sample.py', '--dataset_name=lsun_bedroom', f'--model_path={files / "tiny_cm.pt"}', '--seeds=0-1',
                '--batch=2', '--solver=heun', '--num_steps=3', '--grid=True', f'--outdir={out}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / 'grid.png').is_file()
    # A continuous-time EDM model has no discrete time grid.
    r = run_cli('sample.py', '--dataset_name=lsun_bedroom', f'--model_path={files / "tiny_cm.pt"}',
                '--schedule_type=discrete', f'--outdir={out}', cwd=tmp_path)
    assert_one_line_error(r, '--schedule_type')
