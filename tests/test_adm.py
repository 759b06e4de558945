"""imagenet256 (guided-diffusion ADM + noisy classifier): golden outputs of the reference
networks, full-size checkpoint layouts, classifier guidance, loading and sampling end to end."""

import os

import pytest
import torch

import models
import schedules
import solvers
from dnnlib.util import UserError
from helpers import (assert_full_size_layout, assert_golden_misses, assert_load_fails, assert_one_line_error,
                     check_images, drop_path, golden_network, load_golden, read_spec, run_cli, sample_images,
                     serve_folder, weight_files)
from models import adm, unet, unet_config

# Golden tensors were produced by the reference code on CPU in float32; a re-implementation
# with a different op order differs by float32 round-off (~1e-7 relative, outputs are O(1)).
# 1e-5 leaves room for other BLAS/thread counts and is still ~1e-4 of the change one wrong
# layer makes (see test_golden_detects_wrong_attention_layout).
ATOL = 1e-5


def golden_unet(g, **overrides):
    return golden_network(unet.UNetModel, dict(g['config']['constructor_kwargs'], **overrides), g['state_dict'])


def golden_classifier(g):
    return golden_network(unet.EncoderUNetModel, g['config']['constructor_kwargs'], g['state_dict'])


@torch.no_grad()
def unet_output(net, g):
    return net(g['x'], g['timesteps'], y=g['y'])


@torch.no_grad()
def classifier_logits(net, g):
    return net(g['x'], g['timesteps'])


# ----------------------------------------------------------------------------------------------
# Golden outputs.

def test_golden_unet_classcond():
    g = load_golden('adm_unet_classcond')
    out = unet_output(golden_unet(g), g)
    assert out.shape == g['output'].shape
    torch.testing.assert_close(out, g['output'], atol=ATOL, rtol=0)


def test_golden_classifier():
    g = load_golden('adm_classifier')
    torch.testing.assert_close(classifier_logits(golden_classifier(g), g), g['logits'], atol=ATOL, rtol=0)


def test_golden_detects_wrong_attention_layout():
    """The golden comparison is sharp: the other qkv layout, or one perturbed layer, is caught."""
    g = load_golden('adm_unet_classcond')
    assert (unet_output(golden_unet(g, attention_type='new'), g) - g['output']).abs().max() > 1000 * ATOL
    sd = dict(g['state_dict'])
    sd['output_blocks.1.1.proj_out.bias'] = sd['output_blocks.1.1.proj_out.bias'] + 0.01
    net = golden_network(unet.UNetModel, g['config']['constructor_kwargs'], sd)
    assert (unet_output(net, g) - g['output']).abs().max() > 100 * ATOL


# Each path of the networks matters to the golden outputs: the timestep embedding of every
# ResBlock, the class label, the attention blocks, and the classifier's attention pool.
@pytest.mark.parametrize('path', ['emb_layers', 'label_emb', 'proj_out'])
def test_golden_unet_fails_without(path):
    g = load_golden('adm_unet_classcond')
    assert_golden_misses(unet_output(drop_path(golden_unet(g), path), g), g['output'], atol=ATOL)


@pytest.mark.parametrize('path', ['emb_layers', 'proj_out', 'qkv_proj'])
def test_golden_classifier_fails_without(path):
    g = load_golden('adm_classifier')
    assert_golden_misses(classifier_logits(drop_path(golden_classifier(g), path), g), g['logits'], atol=ATOL)


def test_infer_config_from_golden_state_dicts():
    g = load_golden('adm_unet_classcond')
    cfg = unet_config.infer_unet_config(g['state_dict'], num_head_channels=16)
    ref = g['config']['constructor_kwargs']
    for key in ('model_channels', 'out_channels', 'num_res_blocks', 'attention_resolutions', 'channel_mult',
                'num_classes', 'num_head_channels', 'use_scale_shift_norm', 'resblock_updown'):
        assert cfg[key] == ref[key], key
    g = load_golden('adm_classifier')
    cfg = unet_config.infer_encoder_config(g['state_dict'], num_res_blocks=1, num_head_channels=16)
    ref = g['config']['constructor_kwargs']
    for key in ('image_size', 'model_channels', 'out_channels', 'attention_resolutions', 'channel_mult', 'pool',
                'use_scale_shift_norm', 'resblock_updown'):
        assert cfg[key] == ref[key], key


# ----------------------------------------------------------------------------------------------
# Full-size layouts (no download): our full configs have exactly the real files' keys and shapes,
# and the configs inferred from those shapes are the full configs.

FULL_DIFFUSION = dict(use_scale_shift_norm=True, resblock_updown=True)


@pytest.mark.parametrize('name,cls,infer', [
    ('adm-256x256_diffusion', unet.UNetModel, unet_config.infer_unet_config),
    ('adm-256x256_classifier', unet.EncoderUNetModel, unet_config.infer_encoder_config),
])
def test_full_size_layout(name, cls, infer):
    spec, shapes = read_spec(name)
    kwargs = {k: v for k, v in spec['constructor_kwargs'].items() if k != 'dtype_attr'}
    kwargs.update(FULL_DIFFUSION, image_size=256)
    inferred = infer(shapes)
    if cls is unet.UNetModel:
        inferred['image_size'] = adm.image_size_from_attention(inferred)
    assert inferred['image_size'] == 256 and inferred['num_head_channels'] == 64
    assert inferred.get('num_classes', 1000) == 1000 and inferred['attention_resolutions'] == [8, 16, 32]
    assert_full_size_layout(name, cls, kwargs, inferred)


# ----------------------------------------------------------------------------------------------
# Tiny networks of the same family (attention first at 32 px, 64 channels per head).

def tiny_unet(seed=0, model_channels=64, attention_resolutions=(1, 2), channel_mult=(1, 1)):
    torch.manual_seed(seed)
    return unet.UNetModel(image_size=32, model_channels=model_channels, out_channels=6, num_res_blocks=1,
                              attention_resolutions=attention_resolutions, channel_mult=channel_mult, num_classes=1000,
                              num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True).eval()


def tiny_classifier(seed=1, image_size=32):
    torch.manual_seed(seed)
    return unet.EncoderUNetModel(image_size=image_size, model_channels=32, out_channels=1000, num_res_blocks=2,
                                     attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=64,
                                     use_scale_shift_norm=True, resblock_updown=True, pool='attention').eval()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    return weight_files(tmp_path_factory.mktemp('adm'), tiny_diffusion=tiny_unet().state_dict(),
                        tiny_classifier=tiny_classifier().state_dict(),
                        other={'input_blocks.0.0.weight': torch.zeros(3)})


def labels_of(model, idx):
    return model.conditioning(list(range(len(idx))), torch.tensor(idx))['class_labels']


def test_loader_infers_tiny_config_and_matches_network(files):
    model = models.load('imagenet256', model_path=str(files / 'tiny_diffusion.pt'), guidance_rate=0)
    assert (model.img_channels, model.img_resolution, model.label_dim) == (3, 32, 1000)
    assert model.classifier is None                        # rate 0: the classifier is not even read
    ref = tiny_unet()
    assert {k: torch.equal(v, ref.state_dict()[k]) for k, v in model.net.state_dict().items()} == \
           {k: True for k in ref.state_dict()}
    assert model.sigma_max == pytest.approx(157.4073, rel=1e-5)
    assert model.sigma_min == pytest.approx(0.0100005, rel=1e-4)
    # D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)) with t fractional, first 3 channels.
    model.clip_denoised = False
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 3
    labels = labels_of(model, [5, 999])
    sigma = 2.7
    t = model.sigma_inv(sigma)
    assert 0 < t - t.floor() < 1
    with torch.no_grad():
        eps = ref(x / (1 + sigma ** 2) ** 0.5, torch.full([2], float(t)), y=torch.tensor([5, 999]))[:, :3]
        torch.testing.assert_close(model.denoise(x, sigma, class_labels=labels), x - sigma * eps, atol=1e-5, rtol=0)
        model.clip_denoised = True
        torch.testing.assert_close(model.denoise(x, sigma, class_labels=labels), (x - sigma * eps).clamp(-1, 1),
                                   atol=1e-5, rtol=0)


def small_unet():
    return tiny_unet(model_channels=32, attention_resolutions=(2,), channel_mult=(1, 2))


def small_classifier():
    return tiny_classifier(image_size=16)


def test_rate_zero_equals_unguided():
    """Rate 0 skips the classifier: the denoiser is the unguided one, clamped the same way."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 5     # convolutional: any size
    unguided = adm.ADMModel(small_unet(), None)
    for clip in (True, False):
        zero = adm.ADMModel(small_unet(), small_classifier(), guidance_rate=0.0, clip_denoised=clip)
        zero.classifier_grad = None                        # would fail if the classifier were used
        unguided.clip_denoised = clip
        labels = labels_of(zero, [1, 2])
        with torch.no_grad():
            for sigma in (0.05, 80.0):
                assert torch.equal(zero.denoise(x, sigma, class_labels=labels),
                                   unguided.denoise(x, sigma, class_labels=labels))
    guided = adm.ADMModel(small_unet(), small_classifier(), guidance_rate=3.0, clip_denoised=False)
    with torch.no_grad():
        d = unguided.denoise(x, 4.0, class_labels=labels)
        assert (guided.denoise(x, 4.0, class_labels=labels) - d).abs().max() > 1e-4   # a positive rate acts


def test_guidance_term_matches_finite_differences():
    """eps_uncond - eps_guided = sqrt(1 - abar_t) * rate * grad_{x_in} log p(y | x_in, t): checked in
    float64 against central differences of the classifier's log-probability along random directions."""
    rate = 2.5
    model = adm.ADMModel(tiny_unet(), small_classifier().double(), guidance_rate=rate, clip_denoised=False)
    model.eps_uncond = lambda xv, tt, yy: torch.zeros_like(xv)       # isolate the guidance term
    g = torch.Generator().manual_seed(7)
    x_vp = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    sigma = 1.7
    t = model.sigma_inv(sigma).expand(2)
    y = torch.tensor([3, 600])
    labels = torch.nn.functional.one_hot(y, 1000).double()
    with torch.no_grad():
        term = -model.eps(x_vp, t, class_labels=labels) / (rate * sigma / (1 + sigma ** 2) ** 0.5)

    def log_p(z):
        with torch.no_grad():
            return torch.log_softmax(model.classifier(z, t), dim=-1).gather(1, y[:, None])[:, 0]

    h = 1e-4
    for _ in range(2):
        v = torch.randn(x_vp.shape, generator=g, dtype=torch.float64)
        fd = (log_p(x_vp + h * v) - log_p(x_vp - h * v)) / (2 * h)            # per sample
        analytic = (term * v).flatten(1).sum(1)
        torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=1e-8)
    # The label matters: the gradient for another class differs.
    other = torch.nn.functional.one_hot(torch.tensor([4, 601]), 1000).double()
    with torch.no_grad():
        assert not torch.allclose(model.eps(x_vp, t, class_labels=labels), model.eps(x_vp, t, class_labels=other))


def test_fp16_torso_on_cpu_module_level():
    """The loader refuses use_fp16 off CUDA; the mixed precision itself is checked here: torso
    convs in half, norms / embeddings / output head in float32, output float32 and close."""
    ref = small_unet()
    half = small_unet().convert_to_fp16()
    assert half.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert half.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32      # GroupNorm
    assert half.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32     # Linear
    assert half.out[2].weight.dtype == torch.float32 and half.time_embed[0].weight.dtype == torch.float32
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10.5, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        a, b = ref(x, t, y=y), half(x, t, y=y)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 2e-2 * a.abs().max()


# ----------------------------------------------------------------------------------------------
# Loading: paths, downloads, errors.

def test_classifier_beside_model_and_explicit_path(files, tmp_path):
    model = models.load('imagenet256', model_path=str(files / 'tiny_diffusion.pt'), guidance_rate=1.5)
    assert model.classifier is not None and model.guidance_rate == 1.5
    assert adm.classifier_location(str(files / 'tiny_diffusion.pt')) == str(files / 'tiny_classifier.pt')
    assert adm.classifier_location(adm.MODEL_URL) == adm.URL_BASE + '256x256_classifier.pt'
    default = models.load('imagenet256', model_path=str(files / 'tiny_diffusion.pt'))
    assert default.guidance_rate == adm.DEFAULT_GUIDANCE_RATE == 1.0
    # Alone in a folder: guidance needs the classifier; an explicit classifier_path works.
    lone = tmp_path / 'lone_diffusion.pt'
    lone.write_bytes((files / 'tiny_diffusion.pt').read_bytes())
    with pytest.raises(UserError, match='--model_path: the classifier .*lone_classifier.pt'):
        models.load('imagenet256', model_path=str(lone))
    m = models.load('imagenet256', model_path=str(lone), classifier_path=str(files / 'tiny_classifier.pt'))
    assert m.classifier is not None
    assert models.load('imagenet256', model_path=str(lone), guidance_rate=0).classifier is None


@pytest.mark.parametrize('kwargs,flag', [
    (dict(guidance_type='cfg'), '--guidance_type'),
    (dict(guidance_type='uncond'), '--guidance_type'),
    (dict(guidance_rate=-1.0), '--guidance_rate'),
    (dict(prompt='a cat'), '--prompt'),
    (dict(use_fp16=True), '--use_fp16'),
    (dict(model_path='garbage.pt'), '--model_path'),
    (dict(model_path='other.pt'), '--model_path'),
    (dict(model_path='missing.pt'), '--model_path'),
])
def test_bad_options_and_files_are_one_line_user_errors(files, kwargs, flag):
    kwargs = dict(kwargs, model_path=str(files / kwargs.get('model_path', 'tiny_diffusion.pt')))
    assert_load_fails('imagenet256', flag, **kwargs)


@pytest.fixture(scope='module')
def server(files):
    with serve_folder(files) as url:
        yield url


def test_download_puts_both_files_in_src_cache(tmp_path, monkeypatch, server, files):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(adm, 'MODEL_URL', server + 'missing_diffusion.pt')
    with pytest.raises(UserError) as e:                  # the default download: --model_path was not given
        models.load('imagenet256')
    assert str(e.value).startswith('download of ') and 'pass its local path with --model_path' in str(e.value)
    assert not (tmp_path / 'src').exists()               # no empty ./src/imagenet256/ left behind
    monkeypatch.setattr(adm, 'MODEL_URL', server + 'tiny_diffusion.pt')
    model = models.load('imagenet256')                   # default location: model + classifier beside
    cache = tmp_path / 'src' / 'imagenet256'
    assert sorted(os.listdir(cache)) == ['tiny_classifier.pt', 'tiny_diffusion.pt']
    assert (cache / 'tiny_diffusion.pt').read_bytes() == (files / 'tiny_diffusion.pt').read_bytes()
    assert model.classifier is not None
    # A failed download (no such classifier on the server) leaves nothing half-written.
    (tmp_path / 'second').mkdir()
    monkeypatch.chdir(tmp_path / 'second')
    with pytest.raises(UserError, match='--model_path: download of .*missing_classifier.pt failed'):
        models.load('imagenet256', model_path=server + 'tiny_diffusion.pt',
                    classifier_path=server + 'missing_classifier.pt')
    assert os.listdir(tmp_path / 'second' / 'src' / 'imagenet256') == ['tiny_diffusion.pt']


# ----------------------------------------------------------------------------------------------
# sample.py end to end on a tiny checkpoint in the real on-disk format.

def test_sample_cli_subprocess(files, tmp_path):
    """The real command line, with the default guidance (cg, rate 1): the classifier beside the file."""
    out = tmp_path / 'cli'
    r = run_cli('sample.py', '--dataset_name=imagenet256', f'--model_path={files / "tiny_diffusion.pt"}',
                '--seeds=0-1', '--batch=2', '--solver=euler', '--num_steps=3', f'--outdir={out}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_images(out, 2)
    r = run_cli('sample.py', '--dataset_name=imagenet256', f'--model_path={files / "tiny_diffusion.pt"}',
                '--guidance_type=cfg', f'--outdir={out}', cwd=tmp_path)
    assert_one_line_error(r, '--guidance_type')


# The solver sweep runs in-process (sample.py's click command) and unguided: solvers only ever see
# denoise(x, sigma), and guidance is covered above and by the denoiser tests.
UNGUIDED = ['--dataset_name=imagenet256', '--guidance_rate=0', '--seeds=0-1']


@pytest.mark.parametrize('solver', sorted(solvers.SOLVERS))
def test_sample_every_solver(files, tmp_path, solver):
    record = sample_images(tmp_path / solver, 2, *UNGUIDED, f'--model_path={files / "tiny_diffusion.pt"}',
                           '--batch=2', f'--solver={solver}', '--num_steps=3')
    assert record['t_steps'][0] == pytest.approx(157.4073, rel=1e-5)     # the model's own range


def test_sample_gits_with_discrete_schedule(files, tmp_path):
    record = sample_images(tmp_path / 'gits', 2, *UNGUIDED, f'--model_path={files / "tiny_diffusion.pt"}',
                           '--batch=4', '--solver=euler', '--num_steps=4', '--dp=True', '--num_warmup=4',
                           '--num_steps_tea=9', '--solver_tea=euler', '--schedule_type=discrete',
                           '--schedule_rho=1')
    assert len(record['t_steps']) == 4 and record['search'] is not None
    # The searched points are teacher points: on the discrete grid of 9 points uniform in t.
    model = models.load('imagenet256', model_path=str(files / 'tiny_diffusion.pt'), guidance_rate=0)
    grid = schedules.get_schedule(9, model.sigma_min, model.sigma_max, 'discrete', 1.0, model=model)
    for t in record['t_steps']:
        assert min(abs(float(g) - t) for g in grid) < 1e-9 * max(t, 1)
