"""Any diffusers pipeline as our denoiser D(x; sigma) (dataset_name `diffusers`).

The pipeline is loaded with diffusers' own classes (`DiffusionPipeline.from_pretrained`) and used
through its own parts: its `encode_prompt`, its network's forward, its VAE with the scaling and
shift factors, SDXL's added time ids, Flux's latent packing and guidance embedding, its
scheduler's sigmas. Nothing here re-implements a network, text encoder or scheduler formula.

Two kinds of denoiser, one EDM parametrisation (x = x0 + sigma * n):

- Discrete VP (UNet2DConditionModel: SD 1.x, SD 2.x, SDXL). sigma = sqrt((1 - abar) / abar) of
  the scheduler's `alphas_cumprod`; the network sees x / sqrt(1 + sigma^2) (diffusers'
  `scale_model_input`) at the fractional timestep of sigma (log-sigma interpolation, as our SD
  v1.5 wrapper, models/discrete.py). Its output is turned into D by the scheduler's
  prediction type (PREDICTIONS below, the formulas of EulerDiscreteScheduler.step).
- Flow matching (SD3Transformer2DModel, FluxTransformer2DModel): x_t = (1 - t) x0 + t eps and the
  network predicts the velocity v = eps - x0. Dividing by 1 - t gives EDM's form with
  sigma = t / (1 - t), so our state is x = x_t / (1 - t) = x_t (1 + sigma), t = sigma / (1 + sigma),
  and D = x_t - t v.

Shift (the one place it is applied: `FlowPipelineModel.shift`). A flow scheduler's shift maps t
to s t / (1 + (s - 1) t) (static `shift`), or, with use_dynamic_shifting, to
e^mu t / (e^mu + 1 - t) where mu comes from the image sequence length (Flux, SD3.5 with dynamic
shifting). In EDM sigma both are one multiplication, sigma -> s sigma (s = e^mu for the dynamic
one). The denoiser needs no shift (it takes the shifted time the network was trained on); the
shift sets the model's sigma range (`sigma_min`) and converts a schedule back into the
unshifted `sigmas=` a flow pipeline takes (schedule_io.flow_sigmas), since the pipeline shifts
what it is given.

The start of a flow run, t = 1 (pure noise), is sigma = infinity. Our solvers start from a finite
t_steps[0] with x = noise * t_steps[0], so the flow wrapper stands for infinity by a finite
`sigma_max` (FLOW_SIGMA_MAX): at sigma >= sigma_max the network is evaluated at t = 1 exactly (the
data prediction at pure noise, D = x_t - v), and in pipeline mode the run starts from x_t = noise
exactly (x = noise * (1 + sigma_max), `pipeline_noise_scale`). The first Euler step then differs
from the exact one from infinity by t_1 v / sigma_max in x_t (1e-4 |v| at 1e4), while float32
cancellation in x0 + (t_1 - sigma_max) d grows like sigma_max * 6e-8: 1e4 balances the two (see
tests/test_diffusers_pipeline.py::test_flow_first_step_matches_infinity). `denoise` also takes
sigma = inf exactly, with x then the unit noise (the limit of x / sigma): a solver that accepts
t_steps[0] = inf would take x_1 = t_1 * noise + D(noise; inf) as its first Euler step.

Pipeline mode (`pipeline_sigmas`, `pipeline_noise_scale`): the pipeline's own scheduler sigmas for
N points (N inference steps) at this resolution, shift included, from a copy of its scheduler
(set_timesteps as the pipeline calls it), its final 0 dropped: euler on them with
denoise_to_zero is the pipeline's N-step Euler run. The pipeline scales its unit noise by its
scheduler's `init_noise_sigma`, which with SD/SDXL's 'leading' spacing is sqrt(sigma_0^2 + 1), not
sigma_0; pipeline mode starts at that same point (x = noise * pipeline_noise_scale(N), and the
denoiser is then evaluated at sigma_0 on it, as diffusers does). Flow pipelines start at the
noise itself (x_t = noise). SD/SDXL pipelines with another scheduler (PNDM, DDIM) get an
EulerDiscreteScheduler built from their scheduler's config, as one switches a pipeline to Euler.

Guidance (`guidance_rate`, default the pipeline's own `guidance_scale` default): classifier-free
for SD/SDXL/SD3 (one network call on [negative; positive], out_u + rate * (out_c - out_u), only
when rate > 1, as the pipelines do); Flux's distilled guidance embedding (no negative prompt).
"""

import copy
import inspect
import json
import math
import os
import sys

import numpy as np
import torch

from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils.prompts import read_prompt_file
from . import DTYPES as DTYPE_NAMES, reject_options
from .base import Model
from .discrete import DiscreteVPModel
from .sd import StableDiffusion

INSTALL = 'pip install diffusers transformers'
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
FLOW_SIGMA_MAX = 1e4       # stands for sigma = infinity (t = 1) in flow models; see the module doc
DECODE_CHUNK = 8


def require_diffusers():
    """The diffusers module, or one line naming what to install (the project imports without it)."""
    try:
        import diffusers
        import transformers  # noqa: F401  (the pipelines' text encoders)
    except ImportError:
        raise UserError(f'--dataset_name=diffusers needs the diffusers and transformers packages: {INSTALL}') from None
    return diffusers


# ----------------------------------------------------------------------------------------------
# Prediction types of the discrete VP networks: raw output -> D(x; sigma), as EulerDiscreteScheduler
# computes pred_original_sample (same operations, so the same rounding).

PREDICTIONS = {
    'epsilon': lambda x, sigma, out: x - sigma * out,
    'v_prediction': lambda x, sigma, out: out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1),
    'sample': lambda x, sigma, out: out,
}


class PipelineModel(Model):
    """What every pipeline shares: prompts, guidance, dtype, the latent shape, decoding."""
    latent_space = True
    half_dtype = torch.float16     # the model card's half precision (the CUDA default)
    has_negative_prompt = True
    network_name = 'unet'

    def __init__(self, pipe, where, device, dtype, prompt=None, prompts=None, prompt_file=None,
                 negative_prompt=None, guidance_rate=None, resolution=None):
        self.pipe, self.where, self.device, self.dtype = pipe, where, torch.device(device), dtype
        self.use_fp16 = dtype != torch.float32
        self.network = getattr(pipe, self.network_name)
        self.prompt, self.prompts, self.prompt_file = prompt, prompts, prompt_file
        self.negative_prompt = negative_prompt
        default_rate = inspect.signature(type(pipe).__call__).parameters['guidance_scale'].default
        self.guidance_rate = float(default_rate if guidance_rate is None else guidance_rate)
        if not math.isfinite(self.guidance_rate):
            raise UserError(f'--guidance_rate: must be a finite number (got {guidance_rate})')
        self.height, self.width = self.image_size(resolution)
        self.img_channels = self.latent_channels()
        self.latent_height, self.latent_width = self.latent_size()
        self.img_resolution = self.latent_height
        self.scheduler = self.euler_scheduler(pipe.scheduler)

    # Shapes.
    @property
    def shape(self):
        return (self.img_channels, self.latent_height, self.latent_width)

    def default_resolution(self):
        size = getattr(self.pipe, 'default_sample_size', None) or self.network.config.sample_size
        return size * self.pipe.vae_scale_factor

    def size_multiple(self):
        return self.pipe.vae_scale_factor

    def image_size(self, resolution):
        """(height, width) in pixels: the pipeline's default, or --resolution (N or HxW)."""
        if resolution is None:
            return self.default_resolution(), self.default_resolution()
        text = str(resolution).strip().lower()
        parts = text.split('x')
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UserError(f'--resolution: one number or HxW, e.g. 1024 or 768x1344 (got "{resolution}")')
        h, w = (int(parts[0]), int(parts[-1]))
        m = self.size_multiple()
        if h % m or w % m:
            raise UserError(f'--resolution: height and width must be multiples of {m} for this pipeline '
                            f'(got {h}x{w})')
        return h, w

    def latent_channels(self):
        return self.network.config.in_channels

    def latent_size(self):
        return self.height // self.pipe.vae_scale_factor, self.width // self.pipe.vae_scale_factor

    # Prompts: the same rules as Stable Diffusion v1.5 (prompt i for seed i, warm-up seeds draw one).
    prompt_for_seed = StableDiffusion.prompt_for_seed
    check_seeds = StableDiffusion.check_seeds
    warmup_prompt = StableDiffusion.warmup_prompt

    def image_info(self, seed):
        info = {'prompt': self.prompt_for_seed(int(seed))}
        if self.negative_prompt is not None:
            info['negative_prompt'] = self.negative_prompt
        return info

    @property
    def guided(self):
        """Classifier-free guidance runs (two passes), as the pipelines decide: rate > 1."""
        return self.guidance_rate > 1

    @property
    def guidance_passes(self):
        return 2 if self.guided else 1

    def negatives(self, batch):
        return None if self.negative_prompt is None else [self.negative_prompt] * batch

    def conditioning(self, seeds, labels=None):
        return dict(condition=self.encode([self.prompt_for_seed(int(s)) for s in seeds]))

    def warmup_conditioning(self, seeds, labels=None):
        return dict(condition=self.encode([self.warmup_prompt(int(s)) for s in seeds]))

    def encode(self, prompts):
        """The network's keyword arguments for a batch of prompts ([negative; positive] if guided)."""
        raise NotImplementedError

    def prompt_denoiser(self, prompt=None):
        """`denoise(x, sigma)` for one prompt (default: --prompt, or seed 0's) at any batch size,
        its conditioning encoded once per batch size: for searches that split their noise into
        warm-up and check batches (student_search refine=True) and for benchmarks."""
        prompt = self.prompt_for_seed(0) if prompt is None else prompt
        cache = {}

        def denoise(x, sigma):
            if x.shape[0] not in cache:
                cache[x.shape[0]] = self.encode([prompt] * x.shape[0])
            return self.denoise(x, sigma, condition=cache[x.shape[0]])
        return denoise

    # Network.
    def forward(self, x, timestep, cond):
        raise NotImplementedError

    def guided_output(self, x, timestep, cond):
        """The network's output on x (in its dtype), combined over the guidance passes, in float32."""
        x = x.to(self.dtype)
        if not self.guided:
            return self.forward(x, timestep, cond).float()
        out_u, out_c = self.forward(torch.cat([x, x]), torch.cat([timestep, timestep]), cond).chunk(2)
        return out_u + self.guidance_rate * (out_c - out_u)

    # Decoding.
    @torch.no_grad()
    def decode(self, x):
        """Images in [-1, 1] from raw latents, as the pipeline decodes them (scaling and shift
        factors; SDXL's latents_mean/std where the VAE config has them)."""
        vae = self.pipe.vae
        cfg = vae.config
        z = x.float()
        if getattr(cfg, 'latents_mean', None) is not None and getattr(cfg, 'latents_std', None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
            if getattr(cfg, 'shift_factor', None) is not None:
                z = z + cfg.shift_factor
        vae_dtype = next(vae.parameters()).dtype
        images = [vae.decode(c.to(vae_dtype), return_dict=False)[0] for c in z.split(DECODE_CHUNK)]
        return torch.cat(images).float().clamp(-1, 1)

    # Pipeline mode.
    def euler_scheduler(self, scheduler):
        raise NotImplementedError

    def scheduler_at(self, num_steps):
        """A copy of the pipeline's (Euler) scheduler after set_timesteps, called as the pipeline calls it."""
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(**self.timestep_kwargs(num_steps))
        return scheduler

    def timestep_kwargs(self, num_steps):
        return dict(num_inference_steps=num_steps)

    def pipeline_sigmas(self, num_steps):
        """t_steps (float64) of the pipeline's N-step run, in EDM sigma (module doc): N points when
        the scheduler ends at 0 (the last step is then denoise_to_zero), N + 1 when it ends at a
        positive sigma (EulerDiscreteScheduler with final_sigmas_type="sigma_min": run them without)."""
        if int(num_steps) < 2:
            raise UserError(f'--num_steps: the pipeline schedule needs at least 2 points (got {num_steps})')
        sigmas = self.scheduler_at(int(num_steps)).sigmas.double()
        if sigmas[-1] == 0:
            sigmas = sigmas[:-1]
        return self.edm_sigmas(sigmas)

    def pipeline_noise_scale(self, num_steps):
        """The factor of the unit noise where the pipeline's N-step run starts: x = noise * this."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Discrete VP pipelines (UNet2DConditionModel).

class UNetPipelineModel(PipelineModel, DiscreteVPModel):
    def __init__(self, pipe, where, device, dtype, **kw):
        PipelineModel.__init__(self, pipe, where, device, dtype, **kw)
        DiscreteVPModel.__init__(self, self.scheduler.alphas_cumprod.double().numpy(), device)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTIONS:
            raise UserError(f'{where}: prediction_type "{self.prediction_type}" is not supported '
                            f'(supported: {", ".join(PREDICTIONS)})')

    def euler_scheduler(self, scheduler):
        from diffusers import EulerDiscreteScheduler
        if isinstance(scheduler, EulerDiscreteScheduler):
            return scheduler
        return EulerDiscreteScheduler.from_config(scheduler.config)

    def edm_sigmas(self, sigmas):
        return sigmas    # diffusers' discrete sigma is our EDM sigma

    def pipeline_noise_scale(self, num_steps):
        return float(self.scheduler_at(int(num_steps)).init_noise_sigma)

    @torch.no_grad()
    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        if condition is None:
            raise ValueError('a diffusers pipeline needs its text condition (see conditioning())')
        sigma_f = float(sigma)
        t_host = float(self.sigma_inv(sigma_f).to(torch.float32))
        t = torch.full([x.shape[0]], t_host, dtype=torch.float32, device=x.device)
        out = self.guided_output(x / (sigma_f ** 2 + 1) ** 0.5, t, condition)
        return PREDICTIONS[self.prediction_type](x, sigma_f, out).to(x.dtype)

    def forward(self, x, timestep, cond):
        return self.network(x, timestep, return_dict=False, **cond)[0]


class SDPipelineModel(UNetPipelineModel):
    """StableDiffusionPipeline (SD 1.x, SD 2.x including v-prediction)."""

    @torch.no_grad()
    def encode(self, prompts):
        pos, neg = self.pipe.encode_prompt(prompts, self.device, 1, self.guided, negative_prompt=self.negatives(len(prompts)))
        return dict(encoder_hidden_states=torch.cat([neg, pos]) if self.guided else pos)


class SDXLPipelineModel(UNetPipelineModel):
    """StableDiffusionXLPipeline: two CLIP encoders, pooled text embeds and the added time ids
    (original size = target size = the resolution, no crop, as the pipeline's defaults)."""

    @torch.no_grad()
    def encode(self, prompts):
        pipe = self.pipe
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=self.guided,
            negative_prompt=self.negatives(len(prompts)))
        projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)
        size = (self.height, self.width)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pos.dtype,
                                          text_encoder_projection_dim=projection_dim).to(self.device)
        if self.guided:
            pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        time_ids = time_ids.repeat(pos.shape[0], 1)
        return dict(encoder_hidden_states=pos, added_cond_kwargs={'text_embeds': pooled, 'time_ids': time_ids})


# ----------------------------------------------------------------------------------------------
# Flow-matching pipelines (SD3Transformer2DModel, FluxTransformer2DModel).

class FlowPipelineModel(PipelineModel):
    flow_matching = True           # schedule_io exports flow times (sigmas= / ComfyUI SIGMAS)
    half_dtype = torch.bfloat16
    network_name = 'transformer'
    max_shift_default = 1.16        # the pipeline's calculate_shift default for max_shift

    def __init__(self, pipe, where, device, dtype, **kw):
        super().__init__(pipe, where, device, dtype, **kw)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.shift = self.edm_shift()
        t_min = 1 / self.num_train_timesteps
        self.sigma_min = self.shift * t_min / (1 - t_min)
        self.sigma_max = FLOW_SIGMA_MAX

    def euler_scheduler(self, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return scheduler
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)

    # Shift.
    def image_seq_len(self):
        raise NotImplementedError

    def mu(self):
        """The dynamic-shift exponent the pipeline computes for this resolution (its own calculate_shift)."""
        calculate_shift = sys.modules[type(self.pipe).__module__].calculate_shift
        cfg = self.scheduler.config
        return calculate_shift(self.image_seq_len(), cfg.get('base_image_seq_len', 256),
                               cfg.get('max_image_seq_len', 4096), cfg.get('base_shift', 0.5),
                               cfg.get('max_shift', self.max_shift_default))

    def edm_shift(self):
        """The factor the scheduler's shift multiplies EDM sigma by: its shifted time at t = 1/2
        (EDM sigma 1), computed by the scheduler's own time_shift or static shift."""
        if self.scheduler.config.use_dynamic_shifting:
            t = float(self.scheduler.time_shift(self.mu(), 1.0, np.float64(0.5)))
            return t / (1 - t)
        return float(self.scheduler.config.shift)

    # Time.
    def edm_sigmas(self, t):
        """EDM sigma t / (1 - t) of flow times; t = 1 becomes the stand-in for infinity."""
        t = torch.as_tensor(t, dtype=torch.float64)
        sigma = t / (1 - t)
        return torch.where(t >= 1, torch.full_like(t, self.sigma_max), sigma)

    def flow_time(self, sigma):
        """t of an EDM sigma: 1 at (and beyond) the stand-in for infinity."""
        return 1.0 if sigma >= self.sigma_max else sigma / (1 + sigma)

    def pipeline_noise_scale(self, num_steps):
        return 1.0 + float(self.pipeline_sigmas(num_steps)[0])     # x_t = noise: the pipeline's start

    @torch.no_grad()
    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        if condition is None:
            raise ValueError('a diffusers pipeline needs its text condition (see conditioning())')
        sigma_f = float(sigma)
        x_t = x if math.isinf(sigma_f) else x / (1 + sigma_f)       # at infinity x is the unit noise
        t = self.flow_time(sigma_f)
        timestep = torch.full([x.shape[0]], t * self.num_train_timesteps, dtype=torch.float32, device=x.device)
        v = self.guided_output(x_t, timestep, condition)
        return (x_t - t * v).to(x.dtype)

    def timestep_kwargs(self, num_steps):
        kw = dict(num_inference_steps=num_steps)
        if self.scheduler.config.use_dynamic_shifting:
            kw['mu'] = self.mu()
        return kw


class SD3PipelineModel(FlowPipelineModel):
    """StableDiffusion3Pipeline (SD3, SD3.5): CLIP-L, CLIP-G and T5 prompt encoding, CFG."""

    def image_seq_len(self):
        p = self.network.config.patch_size
        return (self.latent_height // p) * (self.latent_width // p)

    @torch.no_grad()
    def encode(self, prompts):
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.guided, negative_prompt=self.negatives(len(prompts)))
        if self.guided:
            pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        return dict(encoder_hidden_states=pos, pooled_projections=pooled)

    def forward(self, x, timestep, cond):
        return self.network(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]


class FluxPipelineModel(FlowPipelineModel):
    """FluxPipeline (Flux.1): CLIP-L pooled + T5 prompt encoding, 2x2 latent packing with image
    ids, the distilled guidance embedding (no classifier-free guidance, no negative prompt)."""
    has_negative_prompt = False
    max_shift_default = 1.15

    @property
    def guided(self):
        return False                 # guidance_rate feeds the guidance embedding instead

    def size_multiple(self):
        return self.pipe.vae_scale_factor * 2

    def default_resolution(self):
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def latent_channels(self):
        return self.network.config.in_channels // 4

    def image_seq_len(self):
        return (self.latent_height // 2) * (self.latent_width // 2)

    def timestep_kwargs(self, num_steps):
        # FluxPipeline passes its own sigmas (unless the scheduler makes flow sigmas) and always mu.
        kw = dict(mu=self.mu())
        if self.scheduler.config.get('use_flow_sigmas', False):
            return dict(kw, num_inference_steps=num_steps)
        return dict(kw, sigmas=np.linspace(1.0, 1 / num_steps, num_steps))

    @torch.no_grad()
    def encode(self, prompts):
        pos, pooled, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1)
        cond = dict(encoder_hidden_states=pos, pooled_projections=pooled, txt_ids=text_ids,
                    img_ids=self.pipe._prepare_latent_image_ids(len(prompts), self.latent_height // 2,
                                                                self.latent_width // 2, self.device, pos.dtype))
        if self.network.config.guidance_embeds:
            cond['guidance'] = torch.full([len(prompts)], self.guidance_rate, device=self.device, dtype=torch.float32)
        return cond

    def forward(self, x, timestep, cond):
        b, c, h, w = x.shape
        packed = self.pipe._pack_latents(x, b, c, h, w)
        out = self.network(hidden_states=packed, timestep=timestep.to(x.dtype) / 1000, return_dict=False,
                           joint_attention_kwargs=None, **cond)[0]
        return self.pipe._unpack_latents(out, self.height, self.width, self.pipe.vae_scale_factor)


# pipeline class name (model_index.json's _class_name) -> wrapper
PIPELINES = {
    'StableDiffusionPipeline': SDPipelineModel,
    'StableDiffusionXLPipeline': SDXLPipelineModel,
    'StableDiffusion3Pipeline': SD3PipelineModel,
    'FluxPipeline': FluxPipelineModel,
}


# ----------------------------------------------------------------------------------------------
# Loading.

def resolve_folder(model_path, diffusers):
    """A local folder as it is; anything else is a hub id, fetched through diffusers' own cache."""
    if os.path.isdir(model_path):
        return str(model_path)
    if os.path.exists(model_path) or os.path.isabs(model_path) or str(model_path).startswith('.'):
        raise UserError(f'--model_path: "{model_path}" is not a folder (a diffusers pipeline is a folder '
                        'with model_index.json, or a Hugging Face hub id)')
    try:
        return diffusers.DiffusionPipeline.download(model_path)
    except Exception as e:   # offline, unknown id, no access: one line, whatever the hub library raised
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + '...'
        raise UserError(f'--model_path: "{model_path}" is no local folder, and fetching it as a Hugging Face hub id '
                        f'failed ({type(e).__name__}: {reason}); offline, pass a local folder or a hub id already in '
                        'the Hugging Face cache') from None


def read_index(folder):
    """(pipeline class name, its components) from model_index.json, checked before any weights load."""
    path = os.path.join(folder, 'model_index.json')
    if not os.path.isfile(path):
        raise UserError(f'--model_path: "{folder}" has no model_index.json (not a diffusers pipeline folder)')
    try:
        with open(path, encoding='utf-8') as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--model_path: cannot read "{path}": {e}') from None
    name = index.get('_class_name')
    if name not in PIPELINES:
        raise UserError(f'--model_path: pipeline class "{name}" is not supported; supported: {", ".join(PIPELINES)}')
    components = [k for k, v in index.items()
                  if not k.startswith('_') and isinstance(v, list) and len(v) == 2 and v[0] is not None]
    missing = [k for k in components if not os.path.isdir(os.path.join(folder, k))]
    if missing:
        raise UserError(f'--model_path: "{folder}" lacks the component folder(s) {", ".join(missing)} '
                        f'that model_index.json lists for {name}')
    return name


def resolve_dtype(dtype, device, wrapper):
    """--dtype: float32, float16 or bfloat16; default the model card's half precision on CUDA,
    float32 elsewhere."""
    if dtype is None:
        return wrapper.half_dtype if torch.device(device).type == 'cuda' else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if str(dtype) not in DTYPES:
        raise UserError(f'--dtype: one of {", ".join(DTYPES)} (got "{dtype}")')
    return DTYPES[str(dtype)]


def load_diffusers(model_path=None, device='cpu', prompt=None, prompt_file=None, negative_prompt=None,
                   guidance_rate=None, resolution=None, dtype=None, **kw):
    reject_options('diffusers', kw)
    diffusers = require_diffusers()
    if model_path is None:
        raise UserError('--model_path: dataset_name "diffusers" needs a pipeline folder (model_index.json) '
                        'or a Hugging Face hub id')
    if (prompt is None) == (prompt_file is None):
        raise UserError('--prompt, --prompt_file: dataset_name "diffusers" needs exactly one of them')
    prompts = read_prompt_file(prompt_file) if prompt_file is not None else None
    folder = resolve_folder(model_path, diffusers)
    name = read_index(folder)
    wrapper = PIPELINES[name]
    if negative_prompt is not None and not wrapper.has_negative_prompt:
        raise UserError(f'--negative_prompt: {name} takes no negative prompt (its guidance is the distilled '
                        'guidance embedding, set by --guidance_rate)')
    torch_dtype = resolve_dtype(dtype, device, wrapper)
    dist.print0(f'Loading the {name} from "{folder}" ({str(torch_dtype).replace("torch.", "")})...')
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'--model_path: cannot load the pipeline in "{folder}": {reason}') from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    vae = getattr(pipe, 'vae', None)
    if vae is not None and torch_dtype == torch.float16 and getattr(vae.config, 'force_upcast', False):
        vae.to(torch.float32)        # the pipeline upcasts such a VAE to decode (SDXL)
    model = wrapper(pipe, folder, device, torch_dtype, prompt=prompt, prompts=prompts, prompt_file=prompt_file,
                    negative_prompt=negative_prompt, guidance_rate=guidance_rate, resolution=resolution)
    model.checkpoint_files = tuple(sorted(
        os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
        if f.endswith(('.safetensors', '.bin'))))
    dist.print0(f'{name}: {model.height}x{model.width}, latents {list(model.shape)}, guidance rate '
                f'{model.guidance_rate}; prompts: '
                + (f'{len(prompts)} from "{prompt_file}"' if prompts is not None else repr(prompt)))
    return model
