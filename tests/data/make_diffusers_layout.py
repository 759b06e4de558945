"""Writes diffusers_sd_layout.json: the published diffusers layout of SD v1, as test data.

Not run by the tests (diffusers is not a dependency). It was run once with diffusers 0.42.1,
torch 2.14.1 (CPU):

    pip install --target /tmp/dfenv --no-deps diffusers==0.42.1
    PYTHONPATH=/tmp/dfenv python tests/data/make_diffusers_layout.py

The file holds, for diffusers' own UNet2DConditionModel and AutoencoderKL:
- `keys`: state_dict names and shapes for the released SD v1.5 configs (unet/config.json and
  vae/config.json of runwayml/stable-diffusion-v1-5) and for two tiny configs of the same blocks;
- `golden`: outputs of the tiny diffusers modules with deterministic weights (`weight_values`,
  imported by tests/test_sd_formats.py) on deterministic inputs: UNet(x, t, context) and VAE decode(z).
"""

import json
import math
import os

import numpy as np
import torch

SD15_UNET = {
    '_class_name': 'UNet2DConditionModel', 'act_fn': 'silu', 'attention_head_dim': 8,
    'block_out_channels': [320, 640, 1280, 1280], 'center_input_sample': False, 'cross_attention_dim': 768,
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4, 'layers_per_block': 2,
    'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32, 'out_channels': 4, 'sample_size': 64,
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']}
SD15_VAE = {
    '_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4, 'in_channels': 3, 'latent_channels': 4, 'layers_per_block': 2,
    'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 512, 'up_block_types': ['UpDecoderBlock2D'] * 4}
# The golden sd_unet_kl_clip shapes: 2 levels, attention on the first, 1 layer per block.
TINY_UNET = dict(SD15_UNET, attention_head_dim=2, block_out_channels=[64, 64], cross_attention_dim=32,
                 down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
                 up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'], layers_per_block=1, sample_size=8)
TINY_VAE = dict(SD15_VAE, block_out_channels=[32, 32], down_block_types=['DownEncoderBlock2D'] * 2,
                up_block_types=['UpDecoderBlock2D'] * 2, layers_per_block=1, sample_size=16)


def weight_values(index, shape):
    """Deterministic weights that any numpy reproduces: PCG64's raw bit stream (stable by numpy's
    policy) seeded by the key's index in sorted order, as uniform values of variance 1/fan-in."""
    n = math.prod(shape)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    raw = np.random.PCG64(index).random_raw(n)
    u = (raw >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return torch.from_numpy((2 * u - 1) * math.sqrt(3 / fan_in)).reshape(shape).float()


def inputs():
    ramp = lambda n, a: torch.sin(torch.arange(n, dtype=torch.float64) * a).float()
    return dict(x=ramp(2 * 4 * 8 * 8, 0.37).reshape(2, 4, 8, 8) * 2, t=torch.tensor([10.0, 700.5]),
                context=ramp(2 * 77 * 32, 0.11).reshape(2, 77, 32), z=ramp(2 * 4 * 8 * 8, 0.23).reshape(2, 4, 8, 8))


def kwargs(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith('_')}


def key_list(module):
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def deterministic(module):
    sd = module.state_dict()
    module.load_state_dict({k: weight_values(i, tuple(sd[k].shape)) for i, k in enumerate(sorted(sd))})
    return module.eval()


def main():
    from diffusers import AutoencoderKL, UNet2DConditionModel     # here only: the tests import this file
    with torch.device('meta'):
        full = {'sd15_unet': key_list(UNet2DConditionModel(**kwargs(SD15_UNET))),
                'sd15_vae': key_list(AutoencoderKL(**kwargs(SD15_VAE)))}
    unet = deterministic(UNet2DConditionModel(**kwargs(TINY_UNET)))
    vae = deterministic(AutoencoderKL(**kwargs(TINY_VAE)))
    x = inputs()
    with torch.no_grad():
        eps = unet(x['x'], x['t'], encoder_hidden_states=x['context']).sample
        decoded = vae.decode(x['z']).sample
    out = dict(generator='diffusers 0.42.1, torch ' + torch.__version__.split('+')[0],
               configs=dict(sd15_unet=SD15_UNET, sd15_vae=SD15_VAE, tiny_unet=TINY_UNET, tiny_vae=TINY_VAE),
               keys=dict(full, tiny_unet=key_list(unet), tiny_vae=key_list(vae)),
               golden=dict(unet=eps.tolist(), vae_decode=decoded.tolist()))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'diffusers_sd_layout.json')
    with open(path, 'w') as f:
        json.dump(out, f, separators=(',', ':'))


if __name__ == '__main__':
    main()
