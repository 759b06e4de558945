"""Stable Diffusion v1.5 (dataset_name ms_coco): text-to-image with classifier-free guidance.

An eps-UNet with cross-attention on KL-f8 latents (4x64x64, scaled by 0.18215), conditioned on
CLIP ViT-L/14 text embeddings [B, 77, 768]. Guidance combines the two passes of one network
call on a batch of 2B (unconditional first): eps = eps_u + rate * (eps_c - eps_u), with eps_u
the embedding of the empty prompt "". At rate 1 that is eps_c exactly, so only the conditional
pass runs (guidance_passes = 1).

Prompts: --prompt (the same for every seed) or --prompt_file (read by torch_utils.prompts: one
prompt a line, MS-COCO captions JSON, a JSON list or a CSV with a `text`/`caption` column); seed i
takes prompt i. GITS warm-up seeds lie outside the sampled ones, so they draw their prompt
at random (seeded by the seed) from the file, as the reference's warm-up sampled captions.

Checkpoints: the released single file, as `.ckpt` (a Lightning pickle, read with
weights_only=True) or `.safetensors` (the same state dict, read with the safetensors library), or
a diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; models/diffusers_sd.py
maps its key names onto the .ckpt's). Config: for a single file, its own config.yaml when there is
one beside it (folder/zip layout as LDM), else the built-in v1-inference settings; for a diffusers
folder, its components' config.json files. The text encoder's shape is read from its weights; its
head count (not visible in shapes) is hidden/64 unless `cond_stage_config.params.text_config`
gives `num_attention_heads` (an extension of ours, used by small test models).
"""

import numpy as np
import torch

from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils.prompts import read_prompt_file
from . import reject_options
from .clip_text import CLIPTextModel, infer_config, tokenize
from .diffusers_sd import is_diffusers_folder, load_folder
from .base import resolve_fp16
from .ldm import LatentDiffusion, build_first_stage, instantiate, ldm_unet, load_parts, schedule, unet_weights

URL = 'https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt'
DEFAULT_GUIDANCE_RATE = 7.5

# The sampling-relevant part of configs/stable-diffusion/v1-inference.yaml.
V1_CONFIG = {'model': {'target': 'ldm.models.diffusion.ddpm.LatentDiffusion', 'params': {
    'linear_start': 0.00085, 'linear_end': 0.012, 'timesteps': 1000, 'image_size': 64, 'channels': 4,
    'conditioning_key': 'crossattn', 'scale_factor': 0.18215, 'use_ema': False,
    'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': {
        'image_size': 32, 'in_channels': 4, 'out_channels': 4, 'model_channels': 320,
        'attention_resolutions': [4, 2, 1], 'num_res_blocks': 2, 'channel_mult': [1, 2, 4, 4], 'num_heads': 8,
        'use_spatial_transformer': True, 'transformer_depth': 1, 'context_dim': 768, 'use_checkpoint': True,
        'legacy': False}},
    'first_stage_config': {'target': 'ldm.models.autoencoder.AutoencoderKL', 'params': {
        'embed_dim': 4, 'ddconfig': {
            'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
            'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}}},
    'cond_stage_config': {'target': 'ldm.modules.encoders.modules.FrozenCLIPEmbedder'}}}}


# ----------------------------------------------------------------------------------------------

class StableDiffusion(LatentDiffusion):
    def __init__(self, unet, first_stage, text_encoder, alphas_cumprod, channels, image_size, scale_factor,
                 guidance_rate=DEFAULT_GUIDANCE_RATE, prompt=None, prompts=None, prompt_file=None, device='cpu',
                 use_fp16=False):
        super().__init__(unet, first_stage, alphas_cumprod, channels, image_size, scale_factor, device, use_fp16)
        self.text_encoder = text_encoder.to(self.device)
        self.context_length = text_encoder.config.max_position_embeddings
        self.guidance_rate = float(guidance_rate)
        self.guidance_passes = 1 if self.guidance_rate == 1 else 2
        self.prompt, self.prompts, self.prompt_file = prompt, prompts, prompt_file
        self._empty = None

    # Text.
    @torch.no_grad()
    def encode_prompts(self, prompts):
        """CLIP last hidden states [B, 77, hidden] of a list of strings (duplicates encoded once)."""
        unique = sorted(set(prompts))
        ids = tokenize(unique, self.context_length).to(self.device)
        emb = self.text_encoder(ids).float()
        return emb[torch.tensor([unique.index(p) for p in prompts], device=self.device)]

    def empty_embedding(self, batch):
        if self._empty is None:
            self._empty = self.encode_prompts([''])
        return self._empty.expand(batch, -1, -1)

    def prompt_for_seed(self, seed):
        if self.prompts is None:
            return self.prompt
        if not 0 <= seed < len(self.prompts):
            raise UserError(f'--seeds: seed {seed} has no prompt; --prompt_file "{self.prompt_file}" has '
                            f'{len(self.prompts)} prompts and seed i takes prompt i, so seeds must lie in '
                            f'0-{len(self.prompts) - 1}')
        return self.prompts[seed]

    def check_seeds(self, seeds):
        """Fail before sampling, not at the first batch that runs out of prompts."""
        if self.prompts is not None and seeds:
            self.prompt_for_seed(max(seeds))
            self.prompt_for_seed(min(seeds))

    def warmup_prompt(self, seed):
        if self.prompts is None:
            return self.prompt
        return self.prompts[int(np.random.default_rng(seed).integers(len(self.prompts)))]

    def _conditioning(self, prompts):
        return dict(condition=self.encode_prompts(prompts), unconditional_condition=self.empty_embedding(len(prompts)))

    def conditioning(self, seeds, labels=None):
        return self._conditioning([self.prompt_for_seed(int(s)) for s in seeds])

    def warmup_conditioning(self, seeds, labels=None):
        """Conditioning for GITS warm-up seeds (not sampled, so not tied to a prompt-file line)."""
        return self._conditioning([self.warmup_prompt(int(s)) for s in seeds])

    def image_info(self, seed):
        return {'prompt': self.prompt_for_seed(int(seed))}

    # Network.
    def eps(self, x_vp, t, condition=None, unconditional_condition=None, **_):
        if condition is None:
            raise ValueError('Stable Diffusion needs a text condition (see conditioning())')
        if self.guidance_passes == 1:
            return self.unet_eps(x_vp, t, condition)
        if unconditional_condition is None:
            raise ValueError('classifier-free guidance needs unconditional_condition')
        # One network call on [unconditional; conditional].
        eps_u, eps_c = self.unet_eps(torch.cat([x_vp, x_vp]), torch.cat([t, t]),
                                     torch.cat([unconditional_condition, condition])).chunk(2)
        return eps_u + self.guidance_rate * (eps_c - eps_u)


def text_weights(sd):
    """Text-encoder weights in our `text_model.*` layout. The released ckpt's position_ids buffer
    is dropped (we compute positions); checkpoints saved by transformers 5.x lack `text_model.`."""
    prefix = 'cond_stage_model.transformer.'
    w = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    w = {k if k.startswith('text_model.') else 'text_model.' + k: v for k, v in w.items()}
    return {k: v for k, v in w.items() if not k.endswith('embeddings.position_ids')}


def build_sd(params, sd, where, device='cpu', use_fp16=False, **prompt_kw):
    if params.get('conditioning_key') != 'crossattn':
        raise UserError(f'{where}: not a text-conditional (crossattn) Stable Diffusion config')
    unet = instantiate(ldm_unet, unet_weights(sd, params.get('use_ema', True))[0], where,
                       **params['unet_config']['params'])
    tw = text_weights(sd)
    if 'text_model.embeddings.token_embedding.weight' not in tw:
        raise UserError(f'{where}: no CLIP text encoder (cond_stage_model.transformer.*) in this checkpoint')
    overrides = ((params['cond_stage_config'].get('params') or {}).get('text_config') or {})
    text_cfg = infer_config(tw, **overrides)
    text = instantiate(CLIPTextModel, tw, where, text_cfg)
    return StableDiffusion(unet, build_first_stage(params, sd, where), text, schedule(params, sd, where),
                           params.get('channels', 4), params.get('image_size', 64), params.get('scale_factor', 1.0),
                           device=device, use_fp16=use_fp16, **prompt_kw)


def load_ms_coco(model_path=None, device='cpu', guidance_type=None, guidance_rate=None, prompt=None,
                 prompt_file=None, use_fp16=None, **kw):
    reject_options('ms_coco', kw)
    if guidance_type not in (None, 'cfg'):
        raise UserError(f'--guidance_type: ms_coco (Stable Diffusion) uses classifier-free guidance; use '
                        f'--guidance_type=cfg (got {guidance_type}; --guidance_rate=1 turns guidance off)')
    rate = DEFAULT_GUIDANCE_RATE if guidance_rate is None else float(guidance_rate)
    if not np.isfinite(rate):
        raise UserError(f'--guidance_rate: must be a finite number (got {guidance_rate})')
    if (prompt is None) == (prompt_file is None):
        raise UserError('--prompt, --prompt_file: ms_coco needs exactly one of them (a prompt for every seed, '
                        'or a file with prompt i for seed i)')
    prompts = read_prompt_file(prompt_file) if prompt_file is not None else None
    use_fp16 = resolve_fp16(use_fp16, device)
    if model_path is not None and is_diffusers_folder(model_path):
        dist.print0(f'Loading ms_coco from the diffusers folder "{model_path}"...')
        params, sd, where, files = load_folder(model_path)
    else:
        params, sd, where, files = load_parts('ms_coco', model_path, V1_CONFIG, URL)
    model = build_sd(params, sd, where, device=device, use_fp16=use_fp16, guidance_rate=rate, prompt=prompt,
                     prompts=prompts, prompt_file=prompt_file)
    model.checkpoint_files = files
    dist.print0(f'Classifier-free guidance rate {rate}; prompts: '
                + (f'{len(prompts)} from "{prompt_file}"' if prompts is not None else repr(prompt)))
    return model
