"""Tiny random diffusers pipelines, built from config dicts with diffusers' and transformers' own
classes (no downloads) and saved in the on-disk layout (`save_pretrained`), for the tests of
models/diffusers_pipeline.py and the smoke run of benchmarks/diffusers_rmse.py.

Sizes follow diffusers' own fast pipeline tests (UNet blocks (32, 64), CLIP hidden 32, 1-2
transformer layers, a 2-block VAE). The CLIP tokenizer is the real CLIP BPE vocabulary, read from
open_clip's bundled bpe_simple_vocab_16e6.txt.gz (the same 49408-token vocabulary as CLIP's
vocab.json / merges.txt); the T5 tokenizer is a small word-level one made with the `tokenizers`
library. `build(kind, folder)` writes one pipeline: 'sdxl', 'sd2v' (SD 2.x v-prediction UNet),
'sd3', 'flux'.
"""

import gzip
import json
import os

import torch

RESOLUTION = 32          # pixels; latents are 4 x 16 x 16 with the 2-block VAE
CLIP_CONTEXT = 77
T5_WORDS = ('a photo of an astronaut riding horse cat dog on the moon red blue green small big tree house '
            'painting drawing in style with and river mountain sky night day').split()


# ----------------------------------------------------------------------------------------------
# Tokenizers.

def clip_tokenizer(folder):
    """transformers' CLIPTokenizer on open_clip's BPE vocabulary (its vocab.json and merges.txt
    are derived exactly as open_clip's SimpleTokenizer derives its encoder)."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer
    merges = gzip.open(oct.default_bpe()).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m.split()) for m in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f)
    with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    return CLIPTokenizer(os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt'),
                         model_max_length=CLIP_CONTEXT)


def t5_tokenizer():
    """A small T5 tokenizer (transformers' own T5 Unigram tokenizer on a word list: pad 0, eos 1,
    unk 2, as T5's), which appends </s> like T5's."""
    from transformers import T5TokenizerFast
    vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('\u2581', -2.0)]
    vocab += [('\u2581' + w, -1.0) for w in T5_WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


# ----------------------------------------------------------------------------------------------
# Components.

def clip_text(with_projection=False, hidden=32, projection=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, hidden_size=hidden, intermediate_size=37,
                         layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                         vocab_size=49408, max_position_embeddings=CLIP_CONTEXT, hidden_act='gelu',
                         projection_dim=projection)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def t5_text(d_model=32):
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=4 + len(T5_WORDS), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels=4, **kw):
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
                         latent_channels=latent_channels, sample_size=RESOLUTION, norm_num_groups=32, **kw).eval()


def unet(cross_attention_dim, **kw):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=RESOLUTION // 2,
                                in_channels=4, out_channels=4, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
                                cross_attention_dim=cross_attention_dim, norm_num_groups=32, **kw).eval()


# ----------------------------------------------------------------------------------------------
# Pipelines.

def sdxl(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    net = unet(64, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type='text_time',
               addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
               projection_class_embeddings_input_dim=80)   # 6 time ids * 8 + pooled 32
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                   steps_offset=1, timestep_spacing='leading', prediction_type='epsilon')
    return StableDiffusionXLPipeline(vae=vae(scaling_factor=0.13025), text_encoder=clip_text(),
                                     text_encoder_2=clip_text(True), tokenizer=clip_tokenizer(folder + '_tok'),
                                     tokenizer_2=clip_tokenizer(folder + '_tok'), unet=net, scheduler=sched,
                                     add_watermarker=False)


def sd2v(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    net = unet(32, attention_head_dim=(2, 4), use_linear_projection=True)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                   steps_offset=1, prediction_type='v_prediction')   # 'linspace' spacing
    return StableDiffusionPipeline(vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(folder + '_tok'),
                                   unet=net, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sd3(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    net = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=1, in_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    tok = clip_tokenizer(folder + '_tok')
    return StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                            use_post_quant_conv=False),
                                    text_encoder=clip_text(True), tokenizer=tok, text_encoder_2=clip_text(True),
                                    tokenizer_2=tok, text_encoder_3=t5_text(), tokenizer_3=t5_tokenizer())


def flux(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=net, scheduler=sched,
                        vae=vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                use_post_quant_conv=False),
                        text_encoder=clip_text(), tokenizer=clip_tokenizer(folder + '_tok'),
                        text_encoder_2=t5_text(), tokenizer_2=t5_tokenizer())


BUILDERS = {'sdxl': sdxl, 'sd2v': sd2v, 'sd3': sd3, 'flux': flux}


def build(kind, folder, seed=0):
    """Build the tiny `kind` pipeline with seeded random weights and save it to `folder`."""
    torch.manual_seed(seed)
    pipe = BUILDERS[kind](str(folder))
    pipe.save_pretrained(str(folder))
    return str(folder)
