"""Checkpoint formats (issue 17): Stable Diffusion as a single-file .safetensors and as a diffusers
model folder loads to the same model as the .ckpt; the diffusers key mapping against diffusers'
own layout; damaged files, incomplete folders and key mismatches are one-line errors with nothing
written; .safetensors state dicts for LDM, ADM and the consistency-models network.

The diffusers layout is test data made once by diffusers 0.42.1 itself
(tests/data/make_diffusers_layout.py; diffusers is not a dependency): the state_dict names and
shapes of its UNet2DConditionModel and AutoencoderKL for the released SD v1.5 configs and for
tiny configs, and the tiny modules' outputs for deterministic weights. Tolerance against those
outputs: atol = rtol = 1e-4 (float32, different op order; measured <= 1e-5, while swapping two
blocks' weights moves the outputs by 0.08-1.6).
"""

import json
import os
import shutil
import sys

import pytest
import safetensors.torch
import torch

import models
import solvers
from conftest import ROOT, SPECS
from dnnlib.util import UserError
from helpers import assert_one_line_error, run_cli
from models import diffusers_sd
from models.autoencoders import AutoencoderKL
from models.clip_text import vocabulary
from models.ldm import ldm_unet as UNetModel
from helpers import write_config, write_lightning_ckpt
from test_ldm import tiny_ldm_config, tiny_ldm_state_dict
from test_sd import PROMPTS, tiny_sd_config, tiny_sd_state_dict

sys.path.insert(0, os.path.join(ROOT, 'tests', 'data'))
from make_diffusers_layout import inputs as golden_inputs, weight_values  # noqa: E402  (no diffusers import)

LAYOUT = json.load(open(os.path.join(ROOT, 'tests', 'data', 'diffusers_sd_layout.json')))
TOL = dict(atol=1e-4, rtol=1e-4)
UNET, VAE, TEXT = (diffusers_sd.CKPT_PREFIX[p] for p in ('unet', 'vae', 'text_encoder'))


@pytest.fixture(scope='module')
def golden():
    return torch.load(os.path.join(SPECS, 'golden', 'sd_unet_kl_clip.pt'), weights_only=True)


def unet_mapping(cfg):
    params, attn = diffusers_sd.unet_params(cfg, 'test')
    return params, diffusers_sd.unet_renames(len(params['channel_mult']), params['num_res_blocks'], attn)


def vae_mapping(cfg):
    params = diffusers_sd.vae_params(cfg, 'test')
    return params, diffusers_sd.vae_renames(len(params['ddconfig']['ch_mult']), params['ddconfig']['num_res_blocks'])


# ----------------------------------------------------------------------------------------------
# The key mapping against diffusers' published layout.

def test_full_size_diffusers_layout_maps_onto_the_ckpt_layout():
    """Every key of diffusers' SD v1.5 UNet and VAE lands on exactly one key of the released .ckpt
    (specs/sd-v1.json) with the same shape (the VAE's linear attention weights as 1x1 convs)."""
    spec = json.load(open(os.path.join(SPECS, 'sd-v1.json')))
    want = {k: tuple(s) for k, s, _ in spec['state_dict_keys'] if k.startswith((UNET, VAE))}
    got = {}
    for part, mapping, prefix in (('unet', unet_mapping, UNET), ('vae', vae_mapping, VAE)):
        keys = LAYOUT['keys'][f'sd15_{part}']
        params, table = mapping(LAYOUT['configs'][f'sd15_{part}'])
        renamed = diffusers_sd.rename({k: torch.empty(s, device='meta') for k, s in keys}, table, 'test')
        assert len(renamed) == len(keys)                      # no two diffusers keys on one of ours
        got.update({prefix + k: tuple(v.shape) for k, v in renamed.items()})
    assert got == want and len(got) == 686 + 248
    # The configs read from the diffusers files are the v1-inference ones.
    v1 = models.sd.V1_CONFIG['model']['params']
    unet, _ = unet_mapping(LAYOUT['configs']['sd15_unet'])
    for key in ('in_channels', 'out_channels', 'model_channels', 'channel_mult', 'num_res_blocks',
                'attention_resolutions', 'num_heads', 'use_spatial_transformer', 'transformer_depth', 'context_dim',
                'legacy'):
        norm = sorted if key == 'attention_resolutions' else (lambda v: v)      # a set of levels
        assert norm(unet[key]) == norm(v1['unet_config']['params'][key]), key
    vae, _ = vae_mapping(LAYOUT['configs']['sd15_vae'])
    assert dict(vae['ddconfig'], resolution=256) == v1['first_stage_config']['params']['ddconfig']


def tiny_module(part, mapping, cls):
    """Our module for a tiny diffusers config, loaded with make_diffusers_layout's weights under
    diffusers' names through the mapping."""
    shapes = dict(map(tuple, LAYOUT['keys'][f'tiny_{part}']))
    weights = {k: weight_values(i, tuple(shapes[k])) for i, k in enumerate(sorted(shapes))}
    params, table = mapping(LAYOUT['configs'][f'tiny_{part}'])
    module = cls(**params).eval()
    module.load_state_dict(diffusers_sd.rename(weights, table, 'test'), strict=True)
    return module


def test_tiny_diffusers_modules_match_diffusers_outputs():
    """Our UNet and decoder, given diffusers-named weights through the mapping, compute what
    diffusers' own modules computed with them."""
    x = golden_inputs()
    unet, vae = tiny_module('unet', unet_mapping, UNetModel), tiny_module('vae', vae_mapping, AutoencoderKL)
    with torch.no_grad():
        torch.testing.assert_close(unet(x['x'], x['t'], x['context']), torch.tensor(LAYOUT['golden']['unet']), **TOL)
        torch.testing.assert_close(vae.decode(x['z']), torch.tensor(LAYOUT['golden']['vae_decode']), **TOL)


# ----------------------------------------------------------------------------------------------
# The tiny SD of test_sd.py in three layouts.

def to_diffusers(ours, part, legacy_attention_names=False):
    """Our tiny weights under diffusers' names (the recorded tiny layout), through the mapping
    that test_tiny_diffusers_modules_match_diffusers_outputs checks against diffusers."""
    keys = dict(map(tuple, LAYOUT['keys'][f'tiny_{part}']))
    _, table = (unet_mapping if part == 'unet' else vae_mapping)(LAYOUT['configs'][f'tiny_{part}'])
    ours_of = {dk: next(iter(diffusers_sd.rename({dk: torch.empty(0)}, table, 'test'))) for dk in keys}
    assert sorted(ours_of.values()) == sorted(ours)             # one to one
    out = {dk: ours[k].reshape(keys[dk]).contiguous() for dk, k in ours_of.items()}
    if legacy_attention_names:   # the names of diffusers < 0.14 (still in many released vae/ files)
        old = {'to_q.': 'query.', 'to_k.': 'key.', 'to_v.': 'value.', 'to_out.0.': 'proj_attn.'}
        out = {next((k.replace(a, b) for a, b in old.items() if '.attentions.' in k and a in k), k): v
               for k, v in out.items()}
    return out


def save_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)


def save_tensors(path, sd):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))


def write_diffusers_folder(folder, sd, legacy_attention_names=False):
    """The tiny SD in the layout of the released diffusers repository."""
    strip = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    save_json(folder / 'model_index.json', {'_class_name': 'StableDiffusionPipeline', '_diffusers_version': '0.6.0',
                                            'unet': ['diffusers', 'UNet2DConditionModel']})
    save_json(folder / 'unet' / 'config.json', LAYOUT['configs']['tiny_unet'])
    save_tensors(folder / 'unet' / 'diffusion_pytorch_model.safetensors', to_diffusers(strip(UNET), 'unet'))
    save_json(folder / 'vae' / 'config.json', dict(LAYOUT['configs']['tiny_vae'], scaling_factor=0.18215))
    vae = to_diffusers(strip(VAE), 'vae', legacy_attention_names)
    torch.save(vae, folder / 'vae' / 'diffusion_pytorch_model.bin')     # the .bin form (torch.save)
    save_json(folder / 'text_encoder' / 'config.json', {
        'architectures': ['CLIPTextModel'], 'hidden_size': 32, 'intermediate_size': 64, 'num_attention_heads': 2,
        'num_hidden_layers': 2, 'max_position_embeddings': 77, 'vocab_size': 49408, 'hidden_act': 'quick_gelu',
        'layer_norm_eps': 1e-05, 'projection_dim': 32, 'model_type': 'clip_text_model'})
    save_tensors(folder / 'text_encoder' / 'model.safetensors', strip(TEXT))
    specials = {v: k for k, v in diffusers_sd.SPECIAL_TOKENS.items()}
    save_json(folder / 'tokenizer' / 'vocab.json', {specials.get(k, k): v for k, v in vocabulary().items()})
    save_json(folder / 'scheduler' / 'scheduler_config.json', {
        '_class_name': 'PNDMScheduler', 'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,
        'num_train_timesteps': 1000, 'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1,
        'trained_betas': None, 'clip_sample': False})
    return folder


@pytest.fixture(scope='module')
def layouts(golden, tmp_path_factory):
    root = tmp_path_factory.mktemp('sd_layouts')
    sd, cfg = tiny_sd_state_dict(golden), tiny_sd_config(golden)
    for name in ('ckpt', 'st'):
        (root / name).mkdir()
        write_config(root / name / 'config.yaml', cfg)
    write_lightning_ckpt(root / 'ckpt' / 'model.ckpt', sd)
    save_tensors(root / 'st' / 'model.safetensors', sd)
    write_diffusers_folder(root / 'diffusers', sd)
    write_diffusers_folder(root / 'diffusers_legacy', sd, legacy_attention_names=True)
    (root / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    return root


def load(path, layouts, **kw):
    return models.load('ms_coco', model_path=str(path), prompt_file=str(layouts / 'prompts.txt'), **kw)


def sample(model, seeds=(0, 2)):
    """A full CFG sampling run (dpmpp, discrete schedule) and its decoded images."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn([len(seeds), *model.shape], generator=g)
    t_steps = torch.tensor([14.6, 3.0, 0.8, 0.2, 0.0292], dtype=torch.float64)
    with torch.no_grad():
        out = solvers.SOLVERS['dpmpp'](model.bind(**model.conditioning(list(seeds))), x * 14.6, t_steps)
        return out, model.decode(out)


def same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def reference(layouts):
    model = load(layouts / 'ckpt' / 'model.ckpt', layouts)
    return model, sample(model)


@pytest.mark.parametrize('form', ['st/model.safetensors', 'st', 'diffusers', 'diffusers_legacy'])
def test_safetensors_and_diffusers_folder_give_the_ckpt_model(layouts, reference, form):
    ref, (x_ref, img_ref) = reference
    model = load(layouts / form, layouts)
    for name in ('unet', 'first_stage', 'text_encoder'):
        assert same_weights(getattr(ref, name), getattr(model, name)), name
    assert torch.equal(ref.alphas_cumprod, model.alphas_cumprod) and model.scale_factor == ref.scale_factor
    assert model.text_encoder.config == ref.text_encoder.config and model.shape == ref.shape
    x, img = sample(model)
    assert torch.equal(x, x_ref) and torch.equal(img, img_ref) and img.std() > 0


def test_sample_cli_takes_a_diffusers_folder(layouts, tmp_path):
    r = run_cli('sample.py', '--dataset_name=ms_coco', f'--model_path={layouts / "diffusers"}', '--seeds=0-1',
                f'--prompt_file={layouts / "prompts.txt"}', '--solver=dpmpp', '--num_steps=3',
                '--schedule_type=discrete', '--schedule_rho=1', f'--outdir={tmp_path}')
    assert r.returncode == 0, r.stderr
    assert 'diffusers folder' in r.stdout
    assert sorted(os.listdir(tmp_path)) == ['000000.json', '000000.png', '000001.json', '000001.png', 'run.json']


# ----------------------------------------------------------------------------------------------
# Errors: one line naming --model_path; nothing written.

def one_line_error(path, layouts, match):
    with pytest.raises(UserError) as e:
        load(path, layouts)
    msg = str(e.value)
    assert msg.startswith('--model_path') and '\n' not in msg and match in msg, msg
    return msg


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_damaged_safetensors_is_one_line_and_writes_nothing(layouts, tmp_path):
    data = (layouts / 'st' / 'model.safetensors').read_bytes()
    (tmp_path / 'config.yaml').write_bytes((layouts / 'st' / 'config.yaml').read_bytes())
    for kind, content in (('corrupted', b'\xff' * 8 + data[8:]), ('truncated', data[:len(data) // 2])):
        path = tmp_path / 'model.safetensors'
        path.write_bytes(content)
        one_line_error(path, layouts, 'truncated or corrupted')
    out = tmp_path / 'out'                   # the CLI: one line, no traceback, no output folder
    r = run_cli('sample.py', '--dataset_name=ms_coco', f'--model_path={path}', '--seeds=0',
                f'--prompt_file={layouts / "prompts.txt"}', f'--outdir={out}')
    assert_one_line_error(r, '--model_path')
    assert 'model.safetensors" as a .safetensors file' in r.stderr and not out.exists()


def test_diffusers_folder_without_unet_is_one_line_and_writes_nothing(layouts, tmp_path):
    folder = copy_folder(layouts / 'diffusers', tmp_path / 'no_unet')
    shutil.rmtree(folder / 'unet')
    out = tmp_path / 'out'
    r = run_cli('sample.py', '--dataset_name=ms_coco', f'--model_path={folder}', '--seeds=0',
                f'--prompt_file={layouts / "prompts.txt"}', f'--outdir={out}')
    assert_one_line_error(r, '--model_path')
    assert 'has no unet/' in r.stderr and not out.exists()


def test_key_mismatches_are_one_line_errors(layouts, tmp_path, golden):
    # A diffusers key with no counterpart (a renamed block), and one missing from the UNet.
    folder = copy_folder(layouts / 'diffusers', tmp_path / 'renamed')
    path = folder / 'unet' / 'diffusion_pytorch_model.safetensors'
    sd = safetensors.torch.load_file(str(path))
    sd['down_blocks.0.resnet.0.conv1.weight'] = sd.pop('down_blocks.0.resnets.0.conv1.weight')
    save_tensors(path, sd)
    one_line_error(folder, layouts, '"down_blocks.0.resnet.0.conv1.weight" has no counterpart')
    del sd['down_blocks.0.resnet.0.conv1.weight']
    save_tensors(path, sd)
    one_line_error(folder, layouts, 'does not match its config')
    # A single .safetensors missing a key, and one with a wrong shape.
    st = tmp_path / 'st'
    st.mkdir()
    (st / 'config.yaml').write_bytes((layouts / 'st' / 'config.yaml').read_bytes())
    sd = tiny_sd_state_dict(golden)
    del sd[UNET + 'out.2.bias']
    save_tensors(st / 'model.safetensors', sd)
    one_line_error(st / 'model.safetensors', layouts, 'out.2.bias')
    sd = tiny_sd_state_dict(golden)
    sd[UNET + 'out.2.bias'] = torch.zeros(5)
    save_tensors(st / 'model.safetensors', sd)
    one_line_error(st / 'model.safetensors', layouts, 'size mismatch')


@pytest.mark.parametrize('part,file,change,match', [
    ('unet', 'config.json', dict(use_linear_projection=True), 'use_linear_projection=True'),
    ('unet', 'config.json', dict(addition_embed_type='text_time'), 'addition_embed_type'),
    ('scheduler', 'scheduler_config.json', dict(prediction_type='v_prediction'), 'epsilon'),
    ('scheduler', 'scheduler_config.json', dict(beta_schedule='linear'), 'scaled_linear'),
    ('vae', 'config.json', dict(down_block_types=['AttnDownEncoderBlock2D'] * 2), 'DownEncoderBlock2D'),
    ('tokenizer', 'vocab.json', {'cat</w>': 7}, '"cat</w>" has id 7'),
    ('text_encoder', None, None, 'no weights'),
])
def test_foreign_diffusers_folders_are_refused(layouts, tmp_path, part, file, change, match):
    folder = copy_folder(layouts / 'diffusers', tmp_path / 'foreign')
    if file is None:
        os.remove(folder / part / 'model.safetensors')
    else:
        cfg = json.load(open(folder / part / file))
        save_json(folder / part / file, dict(cfg, **change))
    one_line_error(folder, layouts, match)


# ----------------------------------------------------------------------------------------------
# .safetensors for the other families.

def test_ldm_safetensors_in_a_release_folder(tmp_path):
    golden = torch.load(os.path.join(SPECS, 'golden', 'ldm_unet_vq.pt'), weights_only=True)
    sd = tiny_ldm_state_dict(golden)
    for name in ('ckpt', 'st'):
        (tmp_path / name).mkdir()
        write_config(tmp_path / name / 'config.yaml', tiny_ldm_config(golden))
    write_lightning_ckpt(tmp_path / 'ckpt' / 'model.ckpt', sd)
    save_tensors(tmp_path / 'st' / 'model.safetensors', sd)
    ref = models.load('lsun_bedroom_ldm', model_path=str(tmp_path / 'ckpt'))
    model = models.load('ffhq_ldm', model_path=str(tmp_path / 'st'))
    assert model.used_ema and same_weights(model.unet, ref.unet) and same_weights(model.first_stage, ref.first_stage)
    assert torch.equal(model.alphas_cumprod, ref.alphas_cumprod)


def test_adm_and_cm_safetensors(tmp_path):
    from test_adm import tiny_classifier, tiny_unet
    from test_cm import tiny_cm
    for name, sd in (('tiny_diffusion', tiny_unet().state_dict()), ('tiny_classifier', tiny_classifier().state_dict()),
                     ('tiny_cm', {k: v.half() for k, v in tiny_cm().state_dict().items()})):
        torch.save(sd, tmp_path / f'{name}.pt')
        save_tensors(tmp_path / f'{name}.safetensors', sd)
    for dataset, name, parts in (('imagenet256', 'tiny_diffusion', ('net', 'classifier')), ('lsun_bedroom', 'tiny_cm', ('net',))):
        ref = models.load(dataset, model_path=str(tmp_path / f'{name}.pt'))
        model = models.load(dataset, model_path=str(tmp_path / f'{name}.safetensors'))  # classifier: the one beside it
        for part in parts:
            assert same_weights(getattr(model, part), getattr(ref, part)), (dataset, part)
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'tiny_cm.safetensors').read_bytes()[:1000])
    with pytest.raises(UserError, match='^--model_path: .*truncated or corrupted'):
        models.load('lsun_bedroom', model_path=str(tmp_path / 'cut.safetensors'))
