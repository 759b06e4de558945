"""The latent-diffusion UNet (`ldm.modules.diffusionmodules.openaimodel.UNetModel`), written anew
so that the released LDM and Stable Diffusion v1 checkpoints load into it with strict=True.

Two attention flavours, chosen by `use_spatial_transformer`:
- LDM (lsun_bedrooms, ffhq): ADM-style self-attention blocks (1-d conv `qkv`, legacy head layout).
- SD v1: SpatialTransformer blocks (self-attention, cross-attention to the CLIP context, GEGLU).
Constructor arguments are the config's `unet_config.params`, verbatim. Options that none of the
supported checkpoints use (scale-shift norm, resblock up/down, new attention order, class labels)
are rejected instead of being implemented untested.

Attention goes through `F.scaled_dot_product_attention`: the same function as the reference's
explicit softmax (up to float rounding), with memory-efficient kernels on GPUs (SD's 4096-token
self-attention at batch 2B would otherwise need tens of GB).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .unet_adm import timestep_embedding  # the same sinusoidal embedding as ADM's


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as the reference does)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def norm32(channels):
    return GroupNorm32(32, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-(dropout)-conv, skip."""

    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(norm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is the (inactive at sampling) dropout; kept so the keys read out_layers.3.
        self.out_layers = nn.Sequential(norm32(out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class AttentionBlock(nn.Module):
    """ADM self-attention over pixels. The 1-d conv `qkv` emits, per head, [q | k | v] channel
    groups of `head_dim` each (the 'legacy' order the LDM checkpoints were trained with)."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))                                       # [b, 3c, T]
        head_dim = c // self.num_heads
        q, k, v = qkv.reshape(b, self.num_heads, 3 * head_dim, -1).transpose(2, 3).split(head_dim, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)                        # [b, heads, T, head_dim]
        h = h.transpose(2, 3).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` to `context` (to itself when context is None); no q/k/v bias."""

    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())   # [1] is dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        h = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(h.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))   # [1] is dropout

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), 1x1 conv in, transformer blocks over the h*w tokens, 1x1 conv out,
    residual. proj_in/proj_out are Conv2d in the CompVis SD v1 code (Linear only in later repos)."""

    def __init__(self, channels, heads, dim_head, depth, context_dim):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.reshape(b, y.shape[1], h * w).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        return x + self.proj_out(y)


class EmbedSequential(nn.ModuleList):
    """A block of layers; each gets what it needs (time embedding, text context, or neither)."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


_UNSUPPORTED = dict(num_classes=None, use_scale_shift_norm=False, resblock_updown=False,
                    use_new_attention_order=False, dims=2, conv_resample=True, n_embed=None)
_IGNORED = ('image_size', 'dropout', 'use_checkpoint', 'use_fp16')   # no effect on the function at sampling


class UNetModel(nn.Module):
    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult=(1, 2, 4, 8), num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
                 use_spatial_transformer=False, transformer_depth=1, context_dim=None, legacy=True, **kwargs):
        super().__init__()
        for name, value in kwargs.items():
            if name in _UNSUPPORTED and value != _UNSUPPORTED[name]:
                raise ValueError(f'UNetModel: {name}={value!r} is not supported (no supported checkpoint uses it)')
            if name not in _UNSUPPORTED and name not in _IGNORED:
                raise TypeError(f'UNetModel: unknown argument {name}')
        if num_heads_upsample != -1 and num_heads_upsample != num_heads:
            raise ValueError('UNetModel: num_heads_upsample different from num_heads is not supported')
        if use_spatial_transformer and context_dim is None:
            raise ValueError('UNetModel: use_spatial_transformer needs context_dim')
        self.use_spatial_transformer = use_spatial_transformer
        self.model_channels = model_channels
        emb_ch = model_channels * 4

        def attention(ch):
            # The head arithmetic of openaimodel, including its `legacy` quirk.
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy and use_spatial_transformer:
                dim_head = ch // heads
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim)
            return AttentionBlock(ch, heads if num_head_channels == -1 else ch // num_head_channels)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential([ResBlock(ch, emb_ch, ch), attention(ch), ResBlock(ch, emb_ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))
        self.out = nn.Sequential(norm32(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None):
        """x [B, C, H, W], timesteps [B] (float allowed: fractional steps), context [B, L, D] (SD)."""
        if self.use_spatial_transformer and context is None:
            raise ValueError('this UNet needs a text context')
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
