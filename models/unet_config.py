"""Constructor arguments of the guided-diffusion UNet family (models/unet.py) recovered from a
state dict's key names and shapes, so that checkpoints of any size of the family load without a
config: `infer_unet_config` for UNetModel (ADM, CM), `infer_encoder_config` for the classifier.
"""

import math
import re

# Everything that shapes a parameter is recoverable from the key names and shapes; the head size
# and the qkv layout are not (they shape no parameter) and come from the caller (the family's
# released flags).


def _shapes(state_dict):
    return {k: tuple(v.shape) if hasattr(v, 'shape') else tuple(v) for k, v in state_dict.items()}


def _count(shapes, prefix):
    pat = re.compile(re.escape(prefix) + r'\.(\d+)\.')
    return 1 + max((int(m.group(1)) for k in shapes for m in [pat.match(k)] if m), default=-1)


def _has(shapes, prefix):
    return any(k.startswith(prefix + '.') for k in shapes)


def _encoder_structure(shapes, num_levels, num_res_blocks):
    """channel_mult, attention ds, resblock_updown, conv_resample from input_blocks."""
    mc = shapes['time_embed.0.weight'][1]
    mult, attn, updown, conv_resample = [], [], False, True
    i, ds = 1, 1
    for level in range(num_levels):
        for _ in range(num_res_blocks):
            out = shapes[f'input_blocks.{i}.0.in_layers.2.weight'][0]
            has_attn = _has(shapes, f'input_blocks.{i}.1')
            i += 1
        mult.append(out // mc)
        if has_attn:
            attn.append(ds)
        if level != num_levels - 1:
            updown = _has(shapes, f'input_blocks.{i}.0.in_layers')
            conv_resample = updown or _has(shapes, f'input_blocks.{i}.0.op')
            i += 1
            ds *= 2
    return dict(model_channels=mc, channel_mult=mult, attention_resolutions=attn, resblock_updown=updown,
                conv_resample=conv_resample)


def _common(shapes):
    first = 'input_blocks.1.0.emb_layers.1.weight'
    out = shapes['input_blocks.1.0.in_layers.2.weight'][0]
    qkv = [s for k, s in shapes.items() if k.endswith('.qkv.weight')]
    return dict(in_channels=shapes['input_blocks.0.0.weight'][1],
                use_scale_shift_norm=shapes[first][0] == 2 * out,
                attention_dims=(len(qkv[0]) - 2) if qkv else 1)


def _has_upsampler(shapes, i):
    """Output block i ends with an upsampler: a layer after the ResBlock that is not attention."""
    return any(_has(shapes, f'output_blocks.{i}.{j}') and not _has(shapes, f'output_blocks.{i}.{j}.qkv')
               for j in (1, 2))


def infer_unet_config(state_dict, num_head_channels=64, attention_type='legacy'):
    """UNetModel kwargs from a state dict (or a name -> shape dict). The number of res blocks
    per level comes from the decoder: each level has num_res_blocks + 1 output blocks, the last
    of which (except at the top level) carries the upsampler."""
    shapes = _shapes(state_dict)
    num_out = _count(shapes, 'output_blocks')
    ups = [i for i in range(num_out) if _has_upsampler(shapes, i)]
    num_res_blocks = ups[0] if ups else num_out - 1          # one level: no upsampler at all
    num_levels = num_out // (num_res_blocks + 1)
    cfg = _encoder_structure(shapes, num_levels, num_res_blocks)
    cfg.update(_common(shapes), num_res_blocks=num_res_blocks, out_channels=shapes['out.2.weight'][0],
               num_classes=shapes['label_emb.weight'][0] if 'label_emb.weight' in shapes else None,
               num_head_channels=num_head_channels, attention_type=attention_type)
    return cfg


def infer_encoder_config(state_dict, num_res_blocks=2, num_head_channels=64, attention_type='legacy'):
    """EncoderUNetModel kwargs from a state dict. The encoder alone cannot tell a downsampling
    ResBlock from a plain one, so the depth (guided-diffusion's classifier_depth, 2 in every
    released classifier) is given; the image size follows from the attention pool's positional
    embedding (one token per position at the lowest resolution, plus the mean token)."""
    shapes = _shapes(state_dict)
    num_in = _count(shapes, 'input_blocks')
    if num_in % (num_res_blocks + 1):
        raise ValueError(f'{num_in} input blocks do not fit classifier depth {num_res_blocks}')
    num_levels = num_in // (num_res_blocks + 1)
    cfg = _encoder_structure(shapes, num_levels, num_res_blocks)
    cfg.update(_common(shapes), num_res_blocks=num_res_blocks, num_head_channels=num_head_channels,
               attention_type=attention_type)
    if 'out.2.positional_embedding' in shapes:
        side = math.isqrt(shapes['out.2.positional_embedding'][1] - 1)
        cfg.update(pool='attention', out_channels=shapes['out.2.c_proj.weight'][0],
                   image_size=side * 2 ** (num_levels - 1))
    else:
        cfg.update(pool='adaptive', out_channels=shapes['out.3.weight'][0], image_size=None)
    return cfg
