"""First-stage autoencoders of latent diffusion (`ldm.modules.diffusionmodules.model` Encoder /
Decoder), written anew with the checkpoint's key names:

- VQModel (LDM's VQ-f4, `VQModelInterface`): encode = quant_conv(encoder(x)) *without*
  quantization; decode(h) snaps h to the nearest codebook vector first (taming's
  VectorQuantizer2), then post_quant_conv + decoder.
- AutoencoderKL (SD's KL-f8): encode gives the posterior mean and log-variance (clamped to
  [-30, 20]); decode(z) = decoder(post_quant_conv(z)). Latent scale factors are applied by the
  diffusion wrappers, not here.

Constructor arguments are the config's `first_stage_config.params` (`ddconfig`, `embed_dim`,
`n_embed`); `lossconfig` and other training-only entries are ignored.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Upsample  # nearest-neighbour x2 then a 3x3 conv, the same module in both


def normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv q, k, v, proj_out."""

    def __init__(self, channels):
        super().__init__()
        self.norm = normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        tokens = lambda t: t.reshape(b, 1, c, h * w).transpose(2, 3)        # [b, 1, hw, c]
        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding on the right and bottom only (asymmetric)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _level(blocks, attn, resample=None, resample_name=None):
    """One resolution level as a module with `block`, `attn` (and `downsample`/`upsample`)."""
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(m, resample_name, resample)
    return m


def _mid(ch):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return m


def _run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=True, **_):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        res, in_mult, levels = resolution, (1,) + tuple(ch_mult), []
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[i], ch * mult
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            last = i == len(ch_mult) - 1
            levels.append(_level(blocks, attn, None if last else Downsample(block_in), 'downsample'))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        self.mid = _mid(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, 'downsample'):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, **_):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        levels = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):        # built top-down, stored by level index
            block_out = ch * ch_mult[i]
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            levels[i] = _level(blocks, attn, Upsample(block_in) if i else None, 'upsample')
            res = res * 2 if i else res
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, 'upsample'):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, h):
        """Nearest codebook entry per pixel, [B, H*W] row-major. The distance is expanded as
        |z|^2 + |e|^2 - 2 z.e, as taming does, so that near-ties resolve the same way."""
        z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()
        e = self.embedding.weight.float()
        d = z.square().sum(1, keepdim=True) + e.square().sum(1) - 2 * z @ e.t()
        return d.argmin(1).reshape(h.shape[0], -1)

    def lookup(self, idx, shape):
        b, c, hh, ww = shape
        return self.embedding.weight[idx].reshape(b, hh, ww, c).permute(0, 3, 1, 2)

    def forward(self, h):
        idx = self.indices(h)
        return self.lookup(idx, h.shape).to(h.dtype), idx


class VQModel(nn.Module):
    def __init__(self, ddconfig, embed_dim, n_embed, **_):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig['z_channels'], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig['z_channels'], 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, quantize=True):
        if quantize:
            h, _ = self.quantize(h)
        return self.decoder(self.post_quant_conv(h))


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, embed_dim, **_):
        super().__init__()
        if not ddconfig.get('double_z', True):
            raise ValueError('AutoencoderKL needs double_z=True (mean and log-variance)')
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig['z_channels'], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig['z_channels'], 1)

    def encode(self, x):
        """Posterior (mean, logvar) of the latent."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


# first_stage_config.target's class name -> our module.
FIRST_STAGES = {
    'VQModelInterface': VQModel,
    'VQModel': VQModel,
    'AutoencoderKL': AutoencoderKL,
}
