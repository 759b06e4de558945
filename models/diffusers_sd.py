"""Stable Diffusion v1.x in the diffusers folder layout, read into the original checkpoint layout.

A diffusers model folder (the layout of the released runwayml/stable-diffusion-v1-5 repository
and of CompVis/stable-diffusion-v1-4) holds one folder per component:

    model_index.json
    unet/config.json + diffusion_pytorch_model.safetensors (or .bin)     UNet2DConditionModel
    vae/config.json + diffusion_pytorch_model.safetensors (or .bin)      AutoencoderKL
    text_encoder/config.json + model.safetensors (or pytorch_model.bin)  transformers CLIPTextModel
    tokenizer/vocab.json, merges.txt                                      CLIPTokenizer
    scheduler/scheduler_config.json                                       betas of the training schedule

`load_folder` turns it into what a single-file checkpoint gives (models/ldm.py): the config's
`model.params` and a state dict with the .ckpt key names (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`), so that models/sd.py builds the same
modules from either layout. The renaming follows the diffusers names of each block:

UNet (L = layers_per_block; down level i, up block i = level n-1-i):
    conv_in / time_embedding.linear_{1,2} / conv_norm_out / conv_out
        -> input_blocks.0.0 / time_embed.{0,2} / out.0 / out.2
    down_blocks.i.resnets.j, .attentions.j   -> input_blocks.{1 + i(L+1) + j}.0, .1
    down_blocks.i.downsamplers.0.conv        -> input_blocks.{(i+1)(L+1)}.0.op
    mid_block.resnets.{0,1}, .attentions.0   -> middle_block.{0,2}, middle_block.1
    up_blocks.i.resnets.j, .attentions.j     -> output_blocks.{i(L+1) + j}.0, .1
    up_blocks.i.upsamplers.0.conv            -> output_blocks.{i(L+1) + L}.{1, or 2 after an attention}.conv
    inside a resnet: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
        -> in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection
    (attention blocks keep their inner names: norm, proj_in, transformer_blocks.k.attn1.to_q, ...)
VAE (n levels; the decoder's up blocks are numbered from the lowest resolution):
    {encoder,decoder}.conv_norm_out -> .norm_out; mid_block.resnets.k -> mid.block_{k+1};
    mid_block.attentions.0 -> mid.attn_1 with group_norm, to_q|query, to_k|key, to_v|value,
    to_out.0|proj_attn -> norm, q, k, v, proj_out (linear [C, C] weights become 1x1 convs);
    encoder.down_blocks.i.resnets.j -> encoder.down.i.block.j, .downsamplers.0 -> .downsample;
    decoder.up_blocks.i.resnets.j -> decoder.up.{n-1-i}.block.j, .upsamplers.0 -> .upsample;
    conv_shortcut -> nin_shortcut.
Text encoder: the same transformers names, under `cond_stage_model.transformer.`.

Configs that describe something other than an SD v1 network (SD 2 linear projections, SDXL
added embeddings, v-prediction, other beta schedules, ...) are refused in one line rather than
loaded into the wrong architecture. A key that has no counterpart is a one-line error naming it.
"""

import json
import os

from dnnlib.util import UserError
from .clip_text import vocabulary
from .weights import read_state_dict

PARTS = ('unet', 'vae', 'text_encoder', 'scheduler')
WEIGHT_FILES = {           # in order of preference; the fp16 variants hold the same keys
    'unet': ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin',
             'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.fp16.bin'),
    'text_encoder': ('model.safetensors', 'pytorch_model.bin', 'model.fp16.safetensors', 'pytorch_model.fp16.bin'),
}
WEIGHT_FILES['vae'] = WEIGHT_FILES['unet']
CONFIG_FILES = {'unet': 'config.json', 'vae': 'config.json', 'text_encoder': 'config.json',
                'scheduler': 'scheduler_config.json'}

# diffusers config entries whose SD v1 value is the only one our modules implement (entries that
# are absent take diffusers' default, which is this value).
UNET_FIXED = dict(
    act_fn='silu', flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, center_input_sample=False,
    downsample_padding=1, mid_block_scale_factor=1, use_linear_projection=False, class_embed_type=None,
    addition_embed_type=None, time_cond_proj_dim=None, encoder_hid_dim=None, only_cross_attention=False,
    dual_cross_attention=False, resnet_time_scale_shift='default', mid_block_type='UNetMidBlock2DCrossAttn',
    conv_in_kernel=3, conv_out_kernel=3, time_embedding_type='positional', timestep_post_act=None,
    num_class_embeds=None, projection_class_embeddings_input_dim=None, cross_attention_norm=None,
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_dim=None, time_embedding_act_fn=None,
    addition_time_embed_dim=None, attention_type='default', class_embeddings_concat=False,
    mid_block_only_cross_attention=None, reverse_transformer_layers_per_block=None)
VAE_FIXED = dict(act_fn='silu', norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
                 mid_block_add_attention=True, shift_factor=None)
UNET_BLOCKS = {'down': ('CrossAttnDownBlock2D', 'DownBlock2D'), 'up': ('CrossAttnUpBlock2D', 'UpBlock2D')}
SD_SCALE_FACTOR = 0.18215           # v1-inference.yaml; newer vae configs state it as scaling_factor

RESNET_UNET = {'norm1.': 'in_layers.0.', 'conv1.': 'in_layers.2.', 'time_emb_proj.': 'emb_layers.1.',
               'norm2.': 'out_layers.0.', 'conv2.': 'out_layers.3.', 'conv_shortcut.': 'skip_connection.'}
RESNET_VAE = {'conv_shortcut.': 'nin_shortcut.'}
ATTENTION_VAE = {'group_norm.': 'norm.', 'to_q.': 'q.', 'query.': 'q.', 'to_k.': 'k.', 'key.': 'k.',
                 'to_v.': 'v.', 'value.': 'v.', 'to_out.0.': 'proj_out.', 'proj_attn.': 'proj_out.'}
CKPT_PREFIX = {'unet': 'model.diffusion_model.', 'vae': 'first_stage_model.',
               'text_encoder': 'cond_stage_model.transformer.'}
# HF's CLIPTokenizer names the two special tokens as OpenAI's CLIP did; open_clip renamed them.
SPECIAL_TOKENS = {'<|startoftext|>': '<start_of_text>', '<|endoftext|>': '<end_of_text>'}


def is_diffusers_folder(path):
    """A folder in the diffusers layout: it has model_index.json or one of the component folders."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, 'model_index.json'))
                                    or any(os.path.isdir(os.path.join(path, p)) for p in PARTS[:3]))


# ----------------------------------------------------------------------------------------------
# Configs.

def _check_fixed(cfg, fixed, where):
    for key, want in fixed.items():
        if key in cfg and cfg[key] != want:
            raise UserError(f'{where}: {key}={cfg[key]!r} is not a Stable Diffusion v1 setting (needs {want!r})')


def _single(value, key, where):
    """An int, or a list of equal ints (diffusers allows per-block lists)."""
    values = set(value) if isinstance(value, (list, tuple)) else {value}
    if len(values) != 1:
        raise UserError(f'{where}: {key}={value!r} differs between blocks; SD v1 uses one value')
    return values.pop()


def _levels(cfg, where):
    channels = list(cfg['block_out_channels'])
    base = channels[0]
    if any(c % base for c in channels):
        raise UserError(f'{where}: block_out_channels {channels} are not multiples of the first')
    return base, [c // base for c in channels]


def unet_params(cfg, where):
    """Our UNetModel constructor arguments (the ckpt config's unet_config.params) and the list of
    levels with attention, from a diffusers UNet2DConditionModel config."""
    if cfg.get('_class_name', 'UNet2DConditionModel') != 'UNet2DConditionModel':
        raise UserError(f'{where}: _class_name {cfg["_class_name"]} is not UNet2DConditionModel')
    _check_fixed(cfg, UNET_FIXED, where)
    down, up = list(cfg['down_block_types']), list(cfg['up_block_types'])
    if any(b not in UNET_BLOCKS['down'] for b in down) or any(b not in UNET_BLOCKS['up'] for b in up):
        raise UserError(f'{where}: block types {down} / {up} are not SD v1 blocks ({", ".join(sum(UNET_BLOCKS.values(), ()))})')
    attn = [b.startswith('CrossAttn') for b in down]
    if len(up) != len(down) or [b.startswith('CrossAttn') for b in up] != attn[::-1]:
        raise UserError(f'{where}: up_block_types {up} do not mirror down_block_types {down}')
    base, mult = _levels(cfg, where)
    heads = cfg.get('num_attention_heads') or cfg.get('attention_head_dim', 8)   # SD v1 names the head count attention_head_dim
    params = dict(
        image_size=cfg.get('sample_size', 64), in_channels=cfg.get('in_channels', 4),
        out_channels=cfg.get('out_channels', 4), model_channels=base, channel_mult=mult,
        num_res_blocks=_single(cfg.get('layers_per_block', 2), 'layers_per_block', where),
        attention_resolutions=[2 ** i for i, a in enumerate(attn) if a],
        num_heads=_single(heads, 'attention_head_dim', where), use_spatial_transformer=True,
        transformer_depth=_single(cfg.get('transformer_layers_per_block', 1), 'transformer_layers_per_block', where),
        context_dim=_single(cfg.get('cross_attention_dim', 768), 'cross_attention_dim', where), legacy=False)
    return params, attn


def vae_params(cfg, where):
    """first_stage_config.params of an AutoencoderKL, from a diffusers AutoencoderKL config."""
    if cfg.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
        raise UserError(f'{where}: _class_name {cfg["_class_name"]} is not AutoencoderKL')
    _check_fixed(cfg, VAE_FIXED, where)
    n = len(cfg['block_out_channels'])
    if list(cfg.get('down_block_types', ['DownEncoderBlock2D'] * n)) != ['DownEncoderBlock2D'] * n or \
            list(cfg.get('up_block_types', ['UpDecoderBlock2D'] * n)) != ['UpDecoderBlock2D'] * n:
        raise UserError(f'{where}: only DownEncoderBlock2D / UpDecoderBlock2D blocks (no attention outside the middle) are supported')
    base, mult = _levels(cfg, where)
    z = cfg.get('latent_channels', 4)
    return dict(embed_dim=z, ddconfig=dict(
        double_z=True, z_channels=z, resolution=cfg.get('sample_size', 512), in_channels=cfg.get('in_channels', 3),
        out_ch=cfg.get('out_channels', 3), ch=base, ch_mult=mult, num_res_blocks=cfg.get('layers_per_block', 2),
        attn_resolutions=[], dropout=0.0))


def schedule_params(cfg, where):
    """latent-diffusion's linear_start/linear_end/timesteps. Its "linear" schedule (linear in
    sqrt(beta)) is what diffusers calls "scaled_linear"."""
    if cfg.get('beta_schedule', 'linear') != 'scaled_linear' or cfg.get('trained_betas') is not None:
        raise UserError(f'{where}: beta_schedule {cfg.get("beta_schedule")!r} is not Stable Diffusion\'s '
                        '"scaled_linear" (with no trained_betas)')
    if cfg.get('prediction_type', 'epsilon') != 'epsilon':
        raise UserError(f'{where}: prediction_type {cfg["prediction_type"]!r}: only epsilon-prediction models are supported')
    return dict(linear_start=cfg.get('beta_start', 0.00085), linear_end=cfg.get('beta_end', 0.012),
                timesteps=cfg.get('num_train_timesteps', 1000))


# ----------------------------------------------------------------------------------------------
# Key names. Each table maps a diffusers prefix to (our prefix, renames inside it).

def unet_renames(num_levels, layers, attn):
    table = {'conv_in.': ('input_blocks.0.0.', None), 'time_embedding.linear_1.': ('time_embed.0.', None),
             'time_embedding.linear_2.': ('time_embed.2.', None), 'conv_norm_out.': ('out.0.', None),
             'conv_out.': ('out.2.', None), 'mid_block.attentions.0.': ('middle_block.1.', None)}
    for k in range(2):
        table[f'mid_block.resnets.{k}.'] = (f'middle_block.{2 * k}.', RESNET_UNET)
    for i in range(num_levels):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            table[f'down_blocks.{i}.resnets.{j}.'] = (f'input_blocks.{block}.0.', RESNET_UNET)
            table[f'down_blocks.{i}.attentions.{j}.'] = (f'input_blocks.{block}.1.', None)
        if i < num_levels - 1:
            table[f'down_blocks.{i}.downsamplers.0.conv.'] = (f'input_blocks.{(i + 1) * (layers + 1)}.0.op.', None)
        level_has_attention = attn[num_levels - 1 - i]
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            table[f'up_blocks.{i}.resnets.{j}.'] = (f'output_blocks.{block}.0.', RESNET_UNET)
            table[f'up_blocks.{i}.attentions.{j}.'] = (f'output_blocks.{block}.1.', None)
        if i < num_levels - 1:
            last = i * (layers + 1) + layers
            table[f'up_blocks.{i}.upsamplers.0.conv.'] = (f'output_blocks.{last}.{2 if level_has_attention else 1}.conv.', None)
    return table


def vae_renames(num_levels, layers):
    table = {'quant_conv.': ('quant_conv.', None), 'post_quant_conv.': ('post_quant_conv.', None)}
    for part in ('encoder', 'decoder'):
        table[f'{part}.conv_in.'] = (f'{part}.conv_in.', None)
        table[f'{part}.conv_out.'] = (f'{part}.conv_out.', None)
        table[f'{part}.conv_norm_out.'] = (f'{part}.norm_out.', None)
        table[f'{part}.mid_block.attentions.0.'] = (f'{part}.mid.attn_1.', ATTENTION_VAE)
        for k in range(2):
            table[f'{part}.mid_block.resnets.{k}.'] = (f'{part}.mid.block_{k + 1}.', RESNET_VAE)
    for i in range(num_levels):
        for j in range(layers):
            table[f'encoder.down_blocks.{i}.resnets.{j}.'] = (f'encoder.down.{i}.block.{j}.', RESNET_VAE)
        for j in range(layers + 1):
            table[f'decoder.up_blocks.{i}.resnets.{j}.'] = (f'decoder.up.{num_levels - 1 - i}.block.{j}.', RESNET_VAE)
        if i < num_levels - 1:
            table[f'encoder.down_blocks.{i}.downsamplers.0.conv.'] = (f'encoder.down.{i}.downsample.conv.', None)
            table[f'decoder.up_blocks.{i}.upsamplers.0.conv.'] = (f'decoder.up.{num_levels - 1 - i}.upsample.conv.', None)
    return table


def rename(weights, table, where):
    """Our names for diffusers-named weights (see the module docstring). A key that no prefix of
    the table covers is a one-line error. The VAE's attention projections are linear layers in
    diffusers and 1x1 convolutions in the original, so their 2-d weights gain two unit dims."""
    prefixes = sorted(table, key=len, reverse=True)
    out = {}
    for key, value in weights.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise UserError(f'{where}: key "{key}" has no counterpart in the Stable Diffusion v1 layout')
        ours, inner = table[prefix]
        rest = key[len(prefix):]
        if inner is not None:
            sub = next((p for p in inner if rest.startswith(p)), None)
            if sub is not None:
                rest = inner[sub] + rest[len(sub):]
                if inner is ATTENTION_VAE and rest.endswith('.weight') and value.ndim == 2:
                    value = value[:, :, None, None]
        out[ours + rest] = value
    return out


# ----------------------------------------------------------------------------------------------
# Reading the folder.

def _read_json(path, where):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{where}: cannot read {os.path.basename(path)} ({str(e).splitlines()[0][:200]})') from None
    if not isinstance(data, dict):
        raise UserError(f'{where}: {os.path.basename(path)} is not a JSON object')
    return data


def _part(folder, name):
    """(config, weights or None, where, the file that determines it) of one component folder."""
    where = f'--model_path: "{os.path.join(folder, name)}"'
    sub = os.path.join(folder, name)
    files = WEIGHT_FILES.get(name, ())
    needs = f'{name}/{CONFIG_FILES[name]}' + (f' and {name}/{files[0]} (or {files[1]})' if files else '')
    if not os.path.isdir(sub):
        raise UserError(f'--model_path: the diffusers folder "{folder}" has no {name}/ (it needs {needs})')
    config_path = os.path.join(sub, CONFIG_FILES[name])
    if not os.path.isfile(config_path):
        raise UserError(f'{where}: no {CONFIG_FILES[name]} (a diffusers model folder needs {needs})')
    config = _read_json(config_path, where)
    if not files:
        return config, None, where, config_path
    path = next((os.path.join(sub, f) for f in files if os.path.isfile(os.path.join(sub, f))), None)
    if path is None:
        raise UserError(f'{where}: no weights ({" or ".join(files)})')
    return config, read_state_dict(path), f'--model_path: "{path}"', path


def check_tokenizer(folder):
    """If tokenizer/vocab.json is there, it must be CLIP's BPE vocabulary, which our tokenizer
    (open_clip's copy of it) uses: a fine-tune with another vocabulary would get wrong token ids."""
    path = os.path.join(folder, 'tokenizer', 'vocab.json')
    if not os.path.isfile(path):
        return
    where = f'--model_path: "{path}"'
    vocab = _read_json(path, where)
    ours = vocabulary()
    wrong = next((k for k, v in vocab.items() if ours.get(SPECIAL_TOKENS.get(k, k)) != v), None)
    if wrong is not None or len(vocab) != len(ours):
        detail = f'"{wrong}" has id {vocab[wrong]}' if wrong is not None else f'{len(vocab)} tokens, not {len(ours)}'
        raise UserError(f'{where}: not the CLIP ViT-L/14 vocabulary of SD v1 ({detail}); prompts would be tokenised wrongly')


def load_folder(folder):
    """(params in the ckpt config's `model.params` form, state dict with the .ckpt key names,
    `where` for later messages, the files read: the run's checkpoint identity) of a diffusers SD v1
    folder."""
    unet_cfg, unet_w, unet_where, unet_file = _part(folder, 'unet')
    vae_cfg, vae_w, vae_where, vae_file = _part(folder, 'vae')
    text_cfg, text_w, _, text_file = _part(folder, 'text_encoder')
    sched_cfg, _, sched_where, sched_file = _part(folder, 'scheduler')
    check_tokenizer(folder)
    unet, attn = unet_params(unet_cfg, unet_where)
    vae = vae_params(vae_cfg, vae_where)
    params = dict(schedule_params(sched_cfg, sched_where), image_size=unet['image_size'], channels=unet['in_channels'],
                  conditioning_key='crossattn', scale_factor=vae_cfg.get('scaling_factor', SD_SCALE_FACTOR),
                  use_ema=False,
                  unet_config={'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': unet},
                  first_stage_config={'target': 'ldm.models.autoencoder.AutoencoderKL', 'params': vae},
                  cond_stage_config={'target': 'ldm.modules.encoders.modules.FrozenCLIPEmbedder',
                                     'params': {'text_config': text_cfg}})
    levels = len(unet['channel_mult'])
    sd = {CKPT_PREFIX['unet'] + k: v for k, v in
          rename(unet_w, unet_renames(levels, unet['num_res_blocks'], attn), unet_where).items()}
    sd.update({CKPT_PREFIX['vae'] + k: v for k, v in rename(
        vae_w, vae_renames(len(vae['ddconfig']['ch_mult']), vae['ddconfig']['num_res_blocks']), vae_where).items()})
    sd.update({CKPT_PREFIX['text_encoder'] + k: v for k, v in text_w.items()})
    return params, sd, f'--model_path: "{folder}"', (unet_file, vae_file, text_file, sched_file)
