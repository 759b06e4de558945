"""The guided-diffusion UNet family, its blocks written once. One `UNetModel` is
openai/guided-diffusion's UNet (ADM), openai/consistency_models' UNet (CM) and CompVis
latent-diffusion's `openaimodel.UNetModel` (LDM, and Stable Diffusion v1 with spatial
transformers); `EncoderUNetModel` is guided-diffusion's noisy-image classifier. Parameter names
are the reference ones, so the released state dicts load with strict=True. Where the references
differ, an option chooses:

* `attention_type`: how the qkv projection's 3*C channels split into q, k, v.
  'legacy' (guided-diffusion and LDM default): heads outermost, then (q|k|v), then head_dim.
  'new' (use_new_attention_order) and 'flash' (consistency models): (q|k|v) outermost, then
  heads, then head_dim. Both use softmax(q.k / sqrt(head_dim)).
* `attention_dims`: 1 -> qkv/proj_out are Conv1d (weights [O, I, 1], guided-diffusion, LDM);
  2 -> Conv2d (weights [O, I, 1, 1], consistency models).
* `use_spatial_transformer` (SD): SpatialTransformer layers (models/spatial_transformer.py),
  which attend to a text `context`, in place of the attention blocks; `legacy` is LDM's
  head-size quirk for them.

Mixed precision follows guided-diffusion's `convert_to_fp16`: the convolutions of the torso
(input_blocks, middle_block, output_blocks) hold float16 weights and the activations between
them are float16, while the timestep/label embeddings, every GroupNorm (computed in float32)
and the output head stay float32. Weights are never zero-initialised here: they always come
from a checkpoint. Attention goes through `F.scaled_dot_product_attention`: the references'
explicit softmax up to float rounding, with memory-efficient kernels on GPUs.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .spatial_transformer import SpatialTransformer

# ----------------------------------------------------------------------------------------------
# Building blocks.


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos | sin] of (possibly fractional or negative) timesteps [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) evaluated in its parameters' dtype (float32, also when the
    activations are float16), returned in the activations' dtype."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def conv_nd(dims, *args, **kwargs):
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims](*args, **kwargs)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (use_conv) a 3x3 conv (key `conv`)."""

    def __init__(self, channels, use_conv=True):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode='nearest')
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Strided 3x3 conv (key `op`) or 2x2 average pooling."""

    def __init__(self, channels, use_conv=True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with timestep conditioning: additive, or scale-shift of the second norm
    (`use_scale_shift_norm`). With up/down, both branches are resampled (no params) before the
    first conv, as guided-diffusion does with resblock_updown."""

    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=False, up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        self.resample = Upsample(channels, False) if up else Downsample(channels, False) if down else nn.Identity()
        emb_out = out_channels * (2 if use_scale_shift_norm else 1)       # scale and shift, or a bias
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        # Index 2 is the (inactive at sampling) dropout; kept so the keys read out_layers.3.
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.use_scale_shift_norm = use_scale_shift_norm
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.resample(h), self.resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def split_qkv_legacy(qkv, heads):
    """[B, 3*H*D, T] laid out (heads, q|k|v, D) -> q, k, v as [B*H, T, D]."""
    b, width, t = qkv.shape
    q, k, v = qkv.reshape(b * heads, 3, width // (3 * heads), t).unbind(1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def split_qkv_outer(qkv, heads):
    """[B, 3*H*D, T] laid out (q|k|v, heads, D) -> q, k, v as [B*H, T, D]."""
    b, width, t = qkv.shape
    q, k, v = qkv.reshape(b, 3, heads, width // (3 * heads), t).unbind(1)
    return tuple(z.reshape(b * heads, -1, t).transpose(1, 2) for z in (q, k, v))


QKV_SPLITS = {'legacy': split_qkv_legacy, 'new': split_qkv_outer, 'flash': split_qkv_outer}


def attention(qkv, heads, attention_type):
    """Multi-head softmax attention over the T positions; returns [B, H*D, T]."""
    b, width, t = qkv.shape
    q, k, v = QKV_SPLITS[attention_type](qkv, heads)
    a = F.scaled_dot_product_attention(q, k, v)             # softmax(q k^T / sqrt(D)) v
    return a.transpose(1, 2).reshape(b, width // 3, t)


class AttentionBlock(nn.Module):
    """Self-attention over pixels: GroupNorm, 1x1 `qkv`, multi-head attention, 1x1 `proj_out`, residual."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, attention_type='legacy', attention_dims=1):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f'{channels} channels are not divisible by num_head_channels={num_head_channels}')
            num_heads = channels // num_head_channels
        if attention_type not in QKV_SPLITS:
            raise ValueError(f'attention_type must be one of {", ".join(QKV_SPLITS)}')
        self.num_heads = num_heads
        self.attention_type = attention_type
        self.norm = GroupNorm32(channels)
        self.qkv = conv_nd(attention_dims, channels, 3 * channels, 1)
        self.proj_out = conv_nd(attention_dims, channels, channels, 1)

    def forward(self, x):
        b, c = x.shape[:2]
        inp = x if self.qkv.weight.ndim == 4 else x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(inp)).reshape(b, 3 * c, -1)
        h = attention(qkv, self.num_heads, self.attention_type)
        h = self.proj_out(h.reshape(inp.shape))
        return x + h.reshape(x.shape)


class AttentionPool2d(nn.Module):
    """The classifier head: attention of the mean token over all positions (new qkv order)."""

    def __init__(self, spatial_dim, channels, num_head_channels, out_channels):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(channels, spatial_dim ** 2 + 1))
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.num_heads = channels // num_head_channels

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = attention(self.qkv_proj(x), self.num_heads, 'new')
        return self.c_proj(x)[:, :, 0]


class EmbedSequential(nn.Sequential):
    """A block of layers, each given what it takes: ResBlocks the timestep embedding, spatial
    transformers the text context, the others only x."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Networks.


class _Torso(nn.Module):
    """What UNetModel and EncoderUNetModel share: the time embedding, the encoder half
    (input_blocks) and the middle block, plus the float16 conversion of the torso.
    `attention(ch)` builds the attention layer of a level with ch channels."""

    torso_names = ('input_blocks', 'middle_block')

    def _build_encoder(self, in_channels, model_channels, num_res_blocks, attention_resolutions, channel_mult,
                       conv_resample, use_scale_shift_norm, resblock_updown, attention):
        self.model_channels = model_channels
        emb_ch = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        res = dict(emb_channels=emb_ch, use_scale_shift_norm=use_scale_shift_norm)
        ch = int(channel_mult[0] * model_channels)
        self.input_ch = ch
        blocks = [EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, out_channels=int(mult * model_channels), **res)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                blocks.append(EmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = ResBlock(ch, down=True, **res) if resblock_updown else Downsample(ch, conv_resample)
                blocks.append(EmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = EmbedSequential(ResBlock(ch, **res), attention(ch), ResBlock(ch, **res))
        return ch, chans, ds

    def convert_to_fp16(self):
        """guided-diffusion's convert_to_fp16: torso convolutions in half precision."""
        for name in self.torso_names:
            for m in getattr(self, name).modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.half()
        return self

    @property
    def dtype(self):
        """The torso's dtype (float16 after convert_to_fp16): activations are cast to it."""
        return self.input_blocks[0][0].weight.dtype

    def _embed(self, timesteps):
        emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(emb.to(self.time_embed[0].weight.dtype))


def _attention_type(attention_type, use_new_attention_order):
    return attention_type or ('new' if use_new_attention_order else 'legacy')


class UNetModel(_Torso):
    """The denoising UNet. Arguments are the union of guided-diffusion's and latent-diffusion's
    (`unet_config.params` of an LDM/SD config) plus attention_type/attention_dims (see the module
    docstring). `attention_resolutions` are downsample factors (ds = image_size // resolution), as
    the reference classes take them. The first conv has channel_mult[0] * model_channels
    outputs, as in guided-diffusion (latent-diffusion: model_channels, the same only when
    channel_mult[0] = 1, which models/ldm.py requires)."""

    torso_names = ('input_blocks', 'middle_block', 'output_blocks')

    def __init__(self, image_size=None, in_channels=3, model_channels=128, out_channels=3, num_res_blocks=2,
                 attention_resolutions=(), dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, use_spatial_transformer=False, transformer_depth=1,
                 context_dim=None, n_embed=None, legacy=True, attention_type=None, attention_dims=1):
        super().__init__()
        if dims != 2:
            raise ValueError('only 2-d UNets are supported')
        if n_embed is not None:
            raise ValueError('n_embed (predicting codebook ids) is not supported')
        if use_spatial_transformer and context_dim is None:
            raise ValueError('use_spatial_transformer needs context_dim')
        del dropout, use_checkpoint                      # training-only options
        attention_type = _attention_type(attention_type, use_new_attention_order)
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.num_classes = num_classes
        self.use_spatial_transformer = use_spatial_transformer

        def attention_layer(ch, heads=num_heads):
            if not use_spatial_transformer:
                return AttentionBlock(ch, heads, num_head_channels, attention_type, attention_dims)
            # openaimodel's head arithmetic (always num_heads, never num_heads_upsample), with its
            # `legacy` quirk on the head size.
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            return SpatialTransformer(ch, heads, ch // heads if legacy else dim_head, transformer_depth, context_dim)

        ch, chans, ds = self._build_encoder(in_channels, model_channels, num_res_blocks, attention_resolutions,
                                            channel_mult, conv_resample, use_scale_shift_norm, resblock_updown,
                                            attention_layer)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, model_channels * 4)
        res = dict(emb_channels=model_channels * 4, use_scale_shift_norm=use_scale_shift_norm)
        blocks = []
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), out_channels=int(model_channels * mult), **res)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention_layer(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, up=True, **res) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                blocks.append(EmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(self.input_ch, out_channels, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x, timesteps, context=None, y=None):
        """x [B, C, H, W], timesteps [B] (float allowed: fractional steps), context [B, L, D] (SD),
        y [B] int64 class indices (class-conditional models)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError('pass y (int64 class indices) exactly when the model is class-conditional')
        if self.use_spatial_transformer and context is None:
            raise ValueError('this UNet needs a text context')
        emb = self._embed(timesteps)
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h.to(x.dtype))


class EncoderUNetModel(_Torso):
    """guided-diffusion `EncoderUNetModel` (the noisy ImageNet classifier), pools 'attention'
    (the released classifiers) and 'adaptive'."""

    def __init__(self, image_size, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=2,
                 attention_resolutions=(), dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False, pool='adaptive',
                 attention_type=None, attention_dims=1):
        super().__init__()
        if dims != 2:
            raise ValueError('only 2-d classifiers are supported')
        del dropout, use_checkpoint, num_heads_upsample
        attention_type = _attention_type(attention_type, use_new_attention_order)
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        ch, _, ds = self._build_encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, channel_mult, conv_resample,
            use_scale_shift_norm, resblock_updown,
            lambda ch: AttentionBlock(ch, num_heads, num_head_channels, attention_type, attention_dims))
        if pool == 'attention':
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            head = AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
        elif pool == 'adaptive':
            head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(ch, out_channels, 1), nn.Flatten())
        else:
            raise ValueError(f'unsupported pool "{pool}" (attention or adaptive)')
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), head)
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x, timesteps):
        emb = self._embed(timesteps)
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h.to(x.dtype))
