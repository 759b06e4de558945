"""Stable Diffusion v1.5 (ms_coco): UNet with cross-attention, KL-f8 autoencoder and CLIP text
encoder against the reference's golden outputs; strict loading of the full-size checkpoint
layout; tokenisation; classifier-free guidance; prompts per seed; sample.py end to end with
dpmpp and unipc, with and without GITS, on a tiny model.

Tolerances: atol = rtol = 1e-4 against golden files (float32 reference on CPU; our op order
differs, measured differences <= 2.2e-6 on outputs of magnitude ~2.5). Batched CFG (one pass of
batch 2B) against separate passes: only conv/BLAS blocking differs between batch sizes (~1e-6 on
eps), amplified by sigma * (1 + 2 * rate) in D: atol 2e-4 at rate 7.5, 1e-5 at rate 1.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import models
from conftest import SPECS
from dnnlib.util import UserError
from helpers import (assert_golden_misses, assert_load_fails, assert_one_line_error, drop_path, golden_network,
                     load_golden, read_spec, run_cli, small_release_config, spec_state_dict, write_release)
from models import sd as sd_module
from models.autoencoders import AutoencoderKL
from models.clip_text import CLIPTextConfig, CLIPTextModel, tokenize
from models.discrete import scaled_linear_alphas_cumprod
from models.unet import UNetModel

TOL = dict(atol=1e-4, rtol=1e-4)
PROMPTS = ['a photo of a cat', 'a red bedroom with a large window', 'two dogs, 3 cats']


@pytest.fixture(scope='module')
def golden():
    return load_golden('sd_unet_kl_clip')


def golden_unet(golden):
    return golden_network(UNetModel, golden['config']['unet_constructor_kwargs'], golden['unet_state_dict'])


# ----------------------------------------------------------------------------------------------
# Golden outputs.

def test_golden_text_encoder(golden):
    clip = CLIPTextModel(CLIPTextConfig.from_dict(golden['config']['clip_text_config']))
    clip.load_state_dict(golden['clip_state_dict'], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(clip(golden['input_ids']), golden['context'], **TOL)


def test_golden_unet_with_context(golden):
    unet = golden_unet(golden)
    with torch.no_grad():
        out = unet(golden['x'], golden['timesteps'], golden['context'])
        torch.testing.assert_close(out, golden['unet_output'], **TOL)
        # The context matters (cross-attention is wired in).
        assert (unet(golden['x'], golden['timesteps'], golden['context'].flip(0)) - out).abs().max() > 1e-2


# Each path matters to the golden output: the timestep embedding of every ResBlock, the spatial
# transformers, and within them the cross-attention to the text.
@pytest.mark.parametrize('path', ['emb_layers', 'proj_out', 'attn2'])
def test_golden_unet_fails_without(golden, path):
    with torch.no_grad():
        out = drop_path(golden_unet(golden), path)(golden['x'], golden['timesteps'], golden['context'])
    assert_golden_misses(out, golden['unet_output'], **TOL)


def test_golden_kl_encode_decode(golden):
    vae = AutoencoderKL(**golden['config']['autoencoderkl_constructor_kwargs'])
    vae.load_state_dict(golden['vae_state_dict'], strict=True)
    with torch.no_grad():
        mean, logvar = vae.encode(golden['image'])
        torch.testing.assert_close(mean, golden['posterior_mean'], **TOL)
        torch.testing.assert_close(logvar, golden['posterior_logvar'], **TOL)
        torch.testing.assert_close(vae.decode(golden['z']), golden['decoded'], **TOL)


# ----------------------------------------------------------------------------------------------
# Tokenisation (ids from open_clip's bundled vocabulary, checked by hand against the BPE pieces:
# 320 'a</w>', 1125 'photo</w>', 539 'of</w>', 2368 'cat</w>', 256 '!</w>', 550 'an</w>',
# 18376 'astronaut</w>', 6765 'riding</w>', 4558 'horse</w>', 525 'on</w>', 518 'the</w>',
# 3293 'moon</w>', 269 '.</w>', 1237 'two</w>', 3255 'dogs</w>', 267 ',</w>', 274 '3</w>', 3989 'cats</w>').

BOS, EOS = 49406, 49407
TOKENS = {
    'a photo of a cat': [320, 1125, 539, 320, 2368],
    'A Photo  of a CAT!': [320, 1125, 539, 320, 2368, 256],           # lower-cased, spaces collapsed
    'An astronaut riding a horse on the moon.': [550, 18376, 6765, 320, 4558, 525, 518, 3293, 269],
    'two dogs, 3 cats': [1237, 3255, 267, 274, 3989],
    '': [],
}


def test_tokenizer_ids_and_eos_padding():
    ids = tokenize(list(TOKENS))
    assert ids.shape == (len(TOKENS), 77) and ids.dtype == torch.int64
    for row, body in zip(ids.tolist(), TOKENS.values()):
        assert row == [BOS] + body + [EOS] * (76 - len(body))    # padded with EOS, not zeros
    long = tokenize([' '.join(['bedroom'] * 100)])[0].tolist()   # 'bedroom</w>' is 8411
    assert long == [BOS] + [8411] * 75 + [EOS]


# ----------------------------------------------------------------------------------------------
# Full-size layout: the v1 checkpoint's keys and shapes load strictly into our modules.

def test_full_size_layout_loads_strict():
    spec, _ = read_spec('sd-v1')
    sd = spec_state_dict(spec)
    for key, *_ in spec['keys_in_released_checkpoint_not_in_module_state_dict']:
        sd[key] = torch.arange(77)[None]                      # position_ids of the released ckpt
    params = spec['model_config']['params']
    model = sd_module.build_sd(params, sd, 'sd-v1.json', prompt='x')
    assert model.text_encoder.config == CLIPTextConfig()        # ViT-L/14 text: 12 layers, 12 heads
    counts = [len(m.state_dict()) for m in (model.unet, model.first_stage, model.text_encoder)]
    assert counts == [686, 248, 196]
    assert model.shape == (4, 64, 64) and model.scale_factor == 0.18215
    assert model.unet.time_embed[0].weight.data_ptr() == sd['model.diffusion_model.time_embed.0.weight'].data_ptr()
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964
    # The built-in config (used for a bare .ckpt) is the spec's, for everything sampling reads.
    ours = sd_module.V1_CONFIG['model']['params']
    for key in ('linear_start', 'linear_end', 'timesteps', 'image_size', 'channels', 'scale_factor',
                'conditioning_key', 'unet_config', 'first_stage_config'):
        want = copy.deepcopy(params[key])
        if key == 'first_stage_config':
            for k in ('monitor', 'lossconfig'):
                want['params'].pop(k)
        assert ours[key] == want, key


def test_ldm_builtin_config_matches_release_yaml():
    from models.ldm import LDM_VQ4_CONFIG, read_config
    for name in ('lsun_bedrooms-ldm-vq-4.yaml', 'ffhq-ldm-vq-4.yaml'):
        params = read_config(os.path.join(SPECS, 'configs', name))['model']['params']
        ours = LDM_VQ4_CONFIG['model']['params']
        for key in ('linear_start', 'linear_end', 'timesteps', 'image_size', 'channels', 'unet_config'):
            assert ours[key] == params[key], (name, key)
        fs = copy.deepcopy(params['first_stage_config'])
        for k in ('ckpt_path', 'lossconfig'):
            fs['params'].pop(k)
        assert ours['first_stage_config'] == fs


# ----------------------------------------------------------------------------------------------
# A tiny SD in the release layout: golden UNet and VAE, and a small CLIP with the real vocabulary
# size (so that open_clip's token ids fit).

def tiny_sd_config(golden):
    cfg = small_release_config(sd_module.V1_CONFIG, golden, 'autoencoderkl_constructor_kwargs')
    cfg['model']['params']['cond_stage_config']['params'] = {'text_config': {'num_attention_heads': 2}}
    return cfg


def tiny_sd_state_dict(golden):
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))
    sd = {'model.diffusion_model.' + k: v for k, v in golden['unet_state_dict'].items()}
    sd.update({'first_stage_model.' + k: v for k, v in golden['vae_state_dict'].items()})
    sd.update({'cond_stage_model.transformer.' + k: v for k, v in text.state_dict().items()})
    sd['cond_stage_model.transformer.text_model.embeddings.position_ids'] = torch.arange(77)[None]
    sd['alphas_cumprod'] = torch.tensor(scaled_linear_alphas_cumprod(0.00085, 0.012), dtype=torch.float32)
    return sd


@pytest.fixture(scope='module')
def tiny_sd_dir(golden, tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny_sd')
    write_release(d, tiny_sd_state_dict(golden), tiny_sd_config(golden))
    (d / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    return d


def load_tiny(tiny_sd_dir, **kw):
    kw.setdefault('prompt_file', str(tiny_sd_dir / 'prompts.txt'))
    return models.load('ms_coco', model_path=str(tiny_sd_dir), **kw)


def test_tiny_sd_denoiser_matches_golden_unet(tiny_sd_dir, golden):
    model = load_tiny(tiny_sd_dir, guidance_rate=1.0)
    assert model.guidance_passes == 1 and model.shape == (4, 8, 8)
    for row in (0, 1):
        sigma = float(model.sigma(int(golden['timesteps'][row])))
        x = golden['x'][row:row + 1] * (1 + sigma ** 2) ** 0.5
        got = model.denoise(x, sigma, condition=golden['context'][row:row + 1])
        torch.testing.assert_close(got, x - sigma * golden['unet_output'][row:row + 1], **TOL)
    # decode divides by the scale factor itself.
    torch.testing.assert_close(model.decode(golden['z'] * 0.18215), golden['decoded'], **TOL)


def test_cfg_batches_passes_and_rate_one_is_conditional(tiny_sd_dir):
    guided = load_tiny(tiny_sd_dir)                              # default rate 7.5
    plain = load_tiny(tiny_sd_dir, guidance_type='cfg', guidance_rate=1.0)
    assert guided.guidance_rate == 7.5 and guided.guidance_passes == 2
    cond = guided.conditioning([0, 2])
    assert cond['condition'].shape == cond['unconditional_condition'].shape == (2, 77, 32)
    torch.testing.assert_close(cond['unconditional_condition'][1], guided.encode_prompts([''])[0])
    x = torch.randn([2, 4, 8, 8], generator=torch.Generator().manual_seed(1)) * 3
    sigma = 3.0

    calls = []
    forward = guided.unet.forward
    guided.unet.forward = lambda x, t, c=None: calls.append(x.shape[0]) or forward(x, t, c)
    d_guided = guided.denoise(x, sigma, **cond)
    assert calls == [4]                                          # one network call of batch 2B
    del guided.unet.forward

    d_cond = plain.denoise(x, sigma, condition=cond['condition'])
    d_uncond = plain.denoise(x, sigma, condition=cond['unconditional_condition'])
    # Float rounding (~1e-6 on eps, batch 4 vs 2 changes the conv blocking) is amplified by
    # sigma * (1 + 2 * rate) = 48 in D; a wrong combination would be off by ~|d_cond - d_uncond| * 7.5.
    torch.testing.assert_close(d_guided, d_uncond + 7.5 * (d_cond - d_uncond), atol=2e-4, rtol=0)
    assert (d_guided - (d_cond + 7.5 * (d_uncond - d_cond))).abs().max() > 1e-2      # order matters
    # Rate 1: the conditional denoiser (exactly, as one pass) and through the batched path too.
    torch.testing.assert_close(plain.denoise(x, sigma, **cond), d_cond, atol=0, rtol=0)
    plain.guidance_passes = 2
    torch.testing.assert_close(plain.denoise(x, sigma, **cond), d_cond, atol=1e-5, rtol=1e-5)
    assert (d_cond - d_uncond).abs().max() > 1e-3                # the prompt changes the output


def test_prompts_per_seed(tiny_sd_dir, tmp_path):
    model = load_tiny(tiny_sd_dir)
    assert [model.image_info(s) for s in range(3)] == [{'prompt': p} for p in PROMPTS]
    emb = model.conditioning([2, 0, 2])['condition']
    torch.testing.assert_close(emb, model.encode_prompts([PROMPTS[2], PROMPTS[0], PROMPTS[2]]))
    assert (emb[0] - emb[1]).abs().max() > 1e-3
    with pytest.raises(UserError, match='--seeds.*--prompt_file'):
        model.conditioning([1, 3])
    with pytest.raises(UserError, match='--seeds.*--prompt_file'):
        model.check_seeds([0, 1, 2, 3])
    # GITS warm-up seeds lie outside the file: a prompt from the file, fixed by the seed.
    w = model.warmup_conditioning([10**9, 10**9 + 1])['condition']
    torch.testing.assert_close(w, model.warmup_conditioning([10**9, 10**9 + 1])['condition'])
    assert {model.warmup_prompt(10**9 + i) for i in range(20)} <= set(PROMPTS)
    # MS-COCO captions JSON, and a single --prompt for every seed.
    coco = tmp_path / 'captions.json'
    coco.write_text(json.dumps({'annotations': [{'image_id': 1, 'id': 5, 'caption': ' A cat on a mat. '},
                                                {'image_id': 2, 'id': 6, 'caption': 'A dog.'}]}))
    assert load_tiny(tiny_sd_dir, prompt_file=str(coco)).image_info(1) == {'prompt': 'A dog.'}
    single = models.load('ms_coco', model_path=str(tiny_sd_dir), prompt='a bedroom')
    assert single.image_info(12345) == {'prompt': 'a bedroom'}


@pytest.mark.parametrize('kwargs,error', [
    (dict(guidance_type='cg'), '--guidance_type'),
    (dict(guidance_type='uncond'), '--guidance_type'),
    (dict(prompt_file=None), '--prompt'),                                 # neither prompt nor file
    (dict(prompt='both given'), '--prompt'),
    (dict(prompt_file='missing.txt'), '--prompt_file'),
])
def test_bad_options_are_one_line_user_errors(tiny_sd_dir, kwargs, error):
    kwargs = dict(kwargs)
    prompt_file = kwargs.pop('prompt_file', 'prompts.txt')
    assert_load_fails('ms_coco', error, model_path=str(tiny_sd_dir),
                      prompt_file=prompt_file and str(tiny_sd_dir / prompt_file), **kwargs)


# ----------------------------------------------------------------------------------------------
# sample.py end to end.

GITS = ['--dp=True', '--num_warmup=4', '--num_steps_tea=9', '--num_steps=4', '--solver_tea=euler']


@pytest.mark.parametrize('solver,gits', [('dpmpp', False), ('unipc', True), ('dpmpp', True), ('unipc', False)])
def test_sample_cli_prompt_file(tiny_sd_dir, tmp_path, solver, gits):
    out = tmp_path / 'out'
    r = run_cli('sample.py', '--dataset_name=ms_coco', f'--model_path={tiny_sd_dir}', '--seeds=0-2', '--batch=2',
                f'--prompt_file={tiny_sd_dir / "prompts.txt"}', '--guidance_type=cfg', '--guidance_rate=7.5',
                f'--solver={solver}', '--schedule_type=discrete', '--schedule_rho=1', f'--outdir={out}',
                *(GITS if gits else ['--num_steps=4']))
    assert r.returncode == 0, r.stderr
    assert 'Classifier-free guidance: 6 network passes' in r.stdout        # 3 steps x 2 passes
    for seed, prompt in enumerate(PROMPTS):
        img = np.asarray(Image.open(out / f'{seed:06d}.png'))
        assert img.shape == (16, 16, 3) and img.std() > 0
        assert json.loads((out / f'{seed:06d}.json').read_text()) == {'prompt': prompt}
    record = json.loads((out / 'run.json').read_text())
    assert len(record['t_steps']) == 4 and (record['search'] is not None) == gits


def test_sample_cli_seed_without_prompt(tiny_sd_dir, tmp_path):
    out = tmp_path / 'out'
    r = run_cli('sample.py', '--dataset_name=ms_coco', f'--model_path={tiny_sd_dir}', '--seeds=0-3',
                f'--prompt_file={tiny_sd_dir / "prompts.txt"}', '--num_steps=3', f'--outdir={out}')
    assert_one_line_error(r, '--prompt_file')
    assert '--seeds' in r.stderr
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith('.png')]
