"""Latent diffusion (CompVis/latent-diffusion): lsun_bedroom_ldm and ffhq_ldm, and the pieces
that Stable Diffusion (models/sd.py) shares with them: reading Lightning checkpoints and
config.yaml files, locating/downloading/unpacking the release files, and the eps-model wrapper.

The networks are eps-predictors on VQ-f4 latents (3x64x64). They are exposed as continuous
denoisers in sigma through their own alphas_cumprod (DiscreteVPModel); `decode` quantizes the
latent to the codebook and runs the VQ decoder, as LatentDiffusion.decode_first_stage does.

Weights: the UNet's EMA weights (`model_ema.*`, LitEma shadow buffers named with the dots of the
parameter name removed) are used whenever the config has use_ema (the default), because the
reference sampler runs inside `ema_scope()`, which swaps them in. A checkpoint without them
falls back to the raw weights, with a note.
"""

import copy
import os
import pickle
import shutil
import tempfile
import zipfile

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from . import reject_options
from .autoencoders import FIRST_STAGES
from .base import resolve_fp16
from .discrete import DiscreteVPModel, scaled_linear_alphas_cumprod
from .unet import UNetModel
from .weights import SAFETENSORS_SUFFIX, is_safetensors, read_safetensors

URLS = {
    'lsun_bedroom_ldm': 'https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip',
    'ffhq_ldm': 'https://ommer-lab.com/files/latent-diffusion/ffhq.zip',
}

# The sampling-relevant part of configs/latent-diffusion/{lsun_bedrooms,ffhq}-ldm-vq-4.yaml (both
# models share it), used when a bare .ckpt comes without a config.yaml.
LDM_VQ4_CONFIG = {'model': {'target': 'ldm.models.diffusion.ddpm.LatentDiffusion', 'params': {
    'linear_start': 0.0015, 'linear_end': 0.0195, 'timesteps': 1000, 'image_size': 64, 'channels': 3,
    'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': {
        'image_size': 64, 'in_channels': 3, 'out_channels': 3, 'model_channels': 224,
        'attention_resolutions': [8, 4, 2], 'num_res_blocks': 2, 'channel_mult': [1, 2, 3, 4],
        'num_head_channels': 32}},
    'first_stage_config': {'target': 'ldm.models.autoencoder.VQModelInterface', 'params': {
        'embed_dim': 3, 'n_embed': 8192, 'ddconfig': {
            'double_z': False, 'z_channels': 3, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
            'ch_mult': [1, 2, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}}},
    'cond_stage_config': '__is_unconditional__'}}}

DECODE_CHUNK = 8     # images per first-stage decoder call (a 512x512 decode is memory hungry)


# ----------------------------------------------------------------------------------------------
# Reading checkpoints and configs.

class _Inert:
    """Stand-in for a class a Lightning checkpoint pickles outside its weights (callbacks,
    hyper-parameter containers, paths). It only stores what it is given and runs no code, so
    allowlisting it under such a name keeps torch.load(weights_only=True) safe."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _unloadable(path, e):
    return UserError(f'{path}: not a loadable weights file ({str(e).splitlines()[0] if str(e) else type(e).__name__})')


def load_state_dict(path):
    """The `state_dict` of a Lightning .ckpt, loaded with weights_only=True. Globals that the file
    references outside torch's allowlist (training-only entries) are mapped to inert stand-ins,
    each under exactly the name the file uses; the weights never need them. A .safetensors file
    (the same keys as the .ckpt's state_dict, e.g. v1-5-pruned-emaonly.safetensors) is read with
    the safetensors library instead, never through a pickle reader."""
    if is_safetensors(path):
        return {k: v for k, v in read_safetensors(path).items() if isinstance(v, torch.Tensor)}
    try:
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            stand_ins = [(type(name.rsplit('.', 1)[-1], (_Inert,), {}), name) for name in names]
            with torch.serialization.safe_globals(stand_ins):
                ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        raise _unloadable(path, e) from None
    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise UserError(f'{path}: no state_dict in this checkpoint')
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_config(path):
    """A latent-diffusion config.yaml as plain Python containers (only `model` is used)."""
    from omegaconf import OmegaConf
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:     # omegaconf/yaml raise many types; all mean "unreadable config"
        raise UserError(f'{path}: cannot read this config ({str(e).splitlines()[0]})') from None
    if not isinstance(cfg, dict) or 'params' not in cfg.get('model', {}):
        raise UserError(f'{path}: not a latent-diffusion config (no model.params)')
    return cfg


def class_name(section):
    return str(section['target']).rsplit('.', 1)[-1]


# ----------------------------------------------------------------------------------------------
# Locating the files: ./src/<dataset_name>/, or --model_path (file, folder, zip or URL).

def unpack_zip(zip_path, dest):
    """Extract model.ckpt (and config.yaml) from a release zip into `dest`. Each file is written
    to a temporary name and renamed; model.ckpt goes last, so its presence marks a finished unpack."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            members = {os.path.basename(n): n for n in z.namelist()
                       if os.path.basename(n) in ('model.ckpt', 'config.yaml')}
            if 'model.ckpt' not in members:
                raise UserError(f'{zip_path}: no model.ckpt inside this zip')
            os.makedirs(dest, exist_ok=True)
            for name in ('config.yaml', 'model.ckpt'):
                if name not in members:
                    continue
                fd, tmp = tempfile.mkstemp(dir=dest, prefix=f'.{name}.', suffix='.part')
                try:
                    with os.fdopen(fd, 'wb') as f, z.open(members[name]) as src:
                        shutil.copyfileobj(src, f, 1 << 24)
                    os.replace(tmp, os.path.join(dest, name))
                except BaseException:
                    os.remove(tmp)
                    raise
    except zipfile.BadZipFile:
        raise UserError(f'{zip_path}: not a zip file') from None
    except OSError as e:
        raise UserError(f'cannot unpack {zip_path} into {dest}: {e.strerror}') from None


CHECKPOINT_NAMES = ('model.ckpt', 'model.safetensors')


def _folder_files(folder):
    ckpts = sorted(f for f in os.listdir(folder) if f.endswith(('.ckpt', SAFETENSORS_SUFFIX)))
    named = [f for f in CHECKPOINT_NAMES if f in ckpts]
    ckpt = named[0] if named else (ckpts[0] if len(ckpts) == 1 else None)
    if ckpt is None:
        raise UserError(f'--model_path: folder "{folder}" holds no model.ckpt or model.safetensors '
                        '(or not exactly one .ckpt/.safetensors file)')
    config = os.path.join(folder, 'config.yaml')
    return os.path.join(folder, ckpt), (config if os.path.isfile(config) else None)


def locate(dataset_name, model_path, url):
    """(ckpt path, config.yaml path or None). Default: ./src/<dataset_name>/, downloading `url`
    on first use (a zip is unpacked there and then deleted). A .ckpt path uses the config.yaml
    beside it if there is one; a zip given by --model_path is unpacked into the folder of its name."""
    folder = os.path.join('src', dataset_name)
    if model_path is None:
        if url.endswith('.zip'):
            if not os.path.isfile(os.path.join(folder, 'model.ckpt')):
                zip_path = dnnlib.util.resolve_path(url, cache_dir=folder)
                unpack_zip(zip_path, folder)
                if os.path.samefile(os.path.dirname(os.path.abspath(zip_path)), folder):
                    os.remove(zip_path)      # our download; a local file:// zip is left alone
            return _folder_files(folder)
        model_path = url
    if dnnlib.util.is_url(model_path):
        model_path = dnnlib.util.resolve_path(model_path, cache_dir=folder)
    if os.path.isdir(model_path):
        return _folder_files(model_path)
    if not os.path.isfile(model_path):
        raise UserError(f'--model_path: "{model_path}" does not exist')
    if model_path.endswith('.zip'):
        dest = os.path.splitext(model_path)[0]
        if not os.path.isfile(os.path.join(dest, 'model.ckpt')):
            unpack_zip(model_path, dest)
        return _folder_files(dest)
    config = os.path.join(os.path.dirname(os.path.abspath(model_path)), 'config.yaml')
    return model_path, (config if os.path.isfile(config) else None)


# ----------------------------------------------------------------------------------------------
# Building the networks.

def extract(sd, prefix, drop=()):
    """Module-relative weights under `prefix`, without the sub-prefixes in `drop`."""
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith(tuple(drop))}


def unet_weights(sd, use_ema):
    """The UNet's weights (EMA shadow copies when use_ema and present) and whether EMA was used."""
    raw = extract(sd, 'model.diffusion_model.')
    if not use_ema:
        return raw, False
    ema = {k: sd.get('model_ema.diffusion_model' + k.replace('.', '')) for k in raw}
    missing = [k for k, v in ema.items() if v is None]
    if len(missing) == len(ema):
        dist.print0('Note: this checkpoint has no EMA weights (model_ema.*); using the raw UNet weights')
        return raw, False
    if missing:
        raise UserError(f'checkpoint holds EMA weights for only part of the UNet (none for {missing[0]}, ...)')
    return ema, True


def ldm_unet(use_fp16=False, **params):
    """The UNet of an LDM/SD config's `unet_config.params` (openaimodel.UNetModel's arguments).
    use_fp16 is ignored: the wrappers run the UNet under autocast instead. Refused: class labels
    (the wrappers pass none), and the options where openaimodel computes another function than
    guided-diffusion's UNet: channel_mult[0] != 1 (its first conv has model_channels outputs)
    and a num_heads_upsample of its own."""
    if params.get('num_classes') is not None:
        raise ValueError(f'num_classes={params["num_classes"]} is not supported (no class labels are passed)')
    if params.get('channel_mult', (1,))[0] != 1:
        raise ValueError(f'channel_mult={params["channel_mult"]} is not supported (it must start with 1)')
    if params.get('num_heads_upsample', -1) not in (-1, params.get('num_heads', -1)):
        raise ValueError('num_heads_upsample different from num_heads is not supported')
    return UNetModel(**params)


def instantiate(cls, weights, where, *args, **kwargs):
    """Build `cls` on the meta device (no random init of hundreds of millions of weights) and
    load `weights` with strict=True, in float32."""
    try:
        with torch.device('meta'):
            module = cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f'{where}: the config describes an unsupported network: {e}') from None
    try:
        module.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as e:
        first = ' '.join(str(e).split())[:400]
        raise UserError(f'{where}: the checkpoint does not match its config: {first}') from None
    return module.eval().requires_grad_(False)


def schedule(params, sd, where):
    """alphas_cumprod of the config ("linear" in latent-diffusion = linear in sqrt(beta)), checked
    against the buffer the checkpoint stores, if any."""
    if params.get('beta_schedule', 'linear') != 'linear':
        raise UserError(f'{where}: beta_schedule "{params["beta_schedule"]}" is not supported (only "linear")')
    if params.get('parameterization', 'eps') != 'eps':
        raise UserError(f'{where}: only eps-prediction models are supported')
    ac = scaled_linear_alphas_cumprod(params.get('linear_start', 1e-4), params.get('linear_end', 2e-2),
                                      params.get('timesteps', 1000))
    stored = sd.get('alphas_cumprod')
    if stored is not None and (stored.shape != ac.shape or np.abs(stored.double().numpy() - ac).max() > 1e-5):
        raise UserError(f'{where}: the config\'s schedule does not match the checkpoint\'s alphas_cumprod')
    return ac


def build_first_stage(params, sd, where):
    cls = FIRST_STAGES.get(class_name(params['first_stage_config']))
    if cls is None:
        raise UserError(f'{where}: first stage {params["first_stage_config"]["target"]} is not supported')
    weights = extract(sd, 'first_stage_model.', drop=('loss.',))
    return instantiate(cls, weights, where, **params['first_stage_config']['params'])


class LatentDiffusion(DiscreteVPModel):
    """An eps-UNet on a latent of shape [channels, image_size, image_size] with a first-stage
    decoder. decode(x) = first_stage.decode(x / scale_factor) in float32, in chunks."""

    supports_fp16 = True
    latent_space = True

    def __init__(self, unet, first_stage, alphas_cumprod, channels, image_size, scale_factor=1.0,
                 device='cpu', use_fp16=False):
        super().__init__(alphas_cumprod, device=device)
        self.unet = unet.to(self.device)
        self.first_stage = first_stage.to(self.device)
        self.img_channels, self.img_resolution = int(channels), int(image_size)
        self.scale_factor = float(scale_factor)
        self.use_fp16 = bool(use_fp16)

    def unet_eps(self, x_vp, t, context=None):
        with torch.autocast('cuda', dtype=torch.float16, enabled=self.use_fp16):
            return self.unet(x_vp, t, context).float()

    def eps(self, x_vp, t, **cond):
        return self.unet_eps(x_vp, t)

    @torch.no_grad()
    def decode(self, x):
        z = x.float() / self.scale_factor
        return torch.cat([self.first_stage.decode(c) for c in z.split(DECODE_CHUNK)])




def load_parts(dataset_name, model_path, default_config, url):
    """(model params from the config, state dict, where, files) for a latent-diffusion model;
    `where` starts the error messages about this checkpoint (the flag and the file); `files` are
    the checkpoint and its config file, if any (the run's checkpoint identity)."""
    # rank 0 first: it may download and unpack; the other ranks then find the files in place.
    ckpt, config_path = dist.rank0_first(lambda: locate(dataset_name, model_path, url))
    cfg = read_config(config_path) if config_path else copy.deepcopy(default_config)
    dist.print0(f'Loading {dataset_name} from "{ckpt}" (config: {config_path or "built-in"})...')
    files = (ckpt, config_path) if config_path else (ckpt,)
    return cfg['model']['params'], load_state_dict(ckpt), f'--model_path: "{ckpt}"', files


def build_ldm(params, sd, where, device='cpu', use_fp16=False):
    """An unconditional LDM from its config params and checkpoint weights."""
    if params.get('cond_stage_config', '__is_unconditional__') != '__is_unconditional__' \
            or params.get('conditioning_key') is not None:
        raise UserError(f'{where}: this config is conditional; lsun_bedroom_ldm/ffhq_ldm need an unconditional LDM')
    weights, used_ema = unet_weights(sd, params.get('use_ema', True))
    unet = instantiate(ldm_unet, weights, where, **params['unet_config']['params'])
    model = LatentDiffusion(unet, build_first_stage(params, sd, where), schedule(params, sd, where),
                            params.get('channels', 3), params.get('image_size', 64),
                            params.get('scale_factor', 1.0), device=device, use_fp16=use_fp16)
    model.used_ema = used_ema
    return model


def load_ldm(dataset_name, model_path=None, device='cpu', guidance_type=None, guidance_rate=None,
             use_fp16=None, **kw):
    reject_options(dataset_name, kw)
    if guidance_type not in (None, 'uncond'):
        raise UserError(f'--guidance_type: {dataset_name} is unconditional; use --guidance_type=uncond (got {guidance_type})')
    if guidance_rate is not None and guidance_rate != 1:
        raise UserError(f'--guidance_rate: {dataset_name} is unconditional and takes no guidance rate')
    use_fp16 = resolve_fp16(use_fp16, device)
    params, sd, where, files = load_parts(dataset_name, model_path, LDM_VQ4_CONFIG, URLS[dataset_name])
    model = build_ldm(params, sd, where, device=device, use_fp16=use_fp16)
    model.checkpoint_files = files
    dist.print0(f'UNet weights: {"EMA (model_ema.*)" if model.used_ema else "raw"}')
    return model


def load_lsun_bedroom_ldm(model_path=None, device='cpu', **kw):
    return load_ldm('lsun_bedroom_ldm', model_path, device, **kw)


def load_ffhq_ldm(model_path=None, device='cpu', **kw):
    return load_ldm('ffhq_ldm', model_path, device, **kw)
