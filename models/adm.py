"""imagenet256: guided-diffusion's class-conditional 256x256 ADM with classifier guidance.

The network predicts eps (first 3 of its 6 output channels; the other 3 are the learned
variance, unused by an ODE solver) at discrete timesteps of the linear VP schedule (betas
1e-4..0.02 over 1000 steps). DiscreteVPModel turns it into a denoiser in sigma, feeding
fractional timesteps. Classifier guidance is the reference sampler's `condition_score`:

    eps_guided = eps - sqrt(1 - abar_t) * rate * grad_{x_in} log p(y | x_in, t)

with x_in = x / sqrt(1 + sigma^2) the VP-scaled input the networks see, and the denoised
output D = x - sigma * eps_guided clamped to [-1, 1] (the reference sampler's clip_denoised).
The classifier always runs in float32 (guided-diffusion's classifier_use_fp16 defaults to False).

Files: 256x256_diffusion.pt and 256x256_classifier.pt, plain state dicts, downloaded into
./src/imagenet256/ (the same state dicts converted to .safetensors load too, models/weights.py).
--model_path names the diffusion model (local path or URL); the classifier is looked up beside
it (`classifier_location`). Network configs are inferred from the state dicts
(models/unet_config.py), so smaller checkpoints of the same family load as well.
"""

import math
import os
import urllib.parse

import torch
from torch.nn import functional as F

from dnnlib import util
from dnnlib.util import UserError
from torch_utils import distributed as dist

from .unet import EncoderUNetModel, UNetModel
from .unet_config import infer_encoder_config, infer_unet_config
from .base import resolve_fp16
from .discrete import DiscreteVPModel, linear_alphas_cumprod
from .weights import read_state_dict

URL_BASE = 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/'
MODEL_URL = URL_BASE + '256x256_diffusion.pt'
CLASSIFIER_NAME = '256x256_classifier.pt'
DEFAULT_GUIDANCE_RATE = 1.0     # the GITS code's CGPrecond default (its launch scripts give none)
HEAD_CHANNELS = 64              # --num_head_channels 64 of every released ADM / CM network
ATTENTION_SIDE = 32             # --attention_resolutions 32,16,8: the first attention at 32 pixels

# ----------------------------------------------------------------------------------------------
# Loading helpers shared with models/cm.py.




def fetch(url_or_path, dataset_name, flag='--model_path'):
    """Local path -> itself; URL -> file in ./src/<dataset_name>/ (downloaded atomically once).
    Errors start with `flag`, the option that named the file (None: the default download, whose
    message says what to do offline)."""
    if not util.is_url(url_or_path) and not os.path.isfile(url_or_path):
        raise UserError(f'{flag or "--model_path"}: file not found: {url_or_path}')
    try:
        return dist.rank0_first(lambda: util.resolve_path(url_or_path, cache_dir=os.path.join('src', dataset_name),
                                                          progress=dist.get_rank() == 0))
    except UserError as e:
        if flag is None:
            raise
        raise UserError(f'{flag}: {e}', local=e.local) from None


def _mismatch(net_shapes, sd):
    missing = sorted(set(net_shapes) - set(sd))
    unexpected = sorted(set(sd) - set(net_shapes))
    wrong = sorted(k for k in set(sd) & set(net_shapes) if tuple(sd[k].shape) != net_shapes[k])
    parts = [f'{len(v)} {what} (first: {v[0]})' for what, v in
             (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', wrong)) if v]
    return '; '.join(parts)


def build_network(cls, cfg, sd, path, flag='--model_path'):
    """Construct `cls(**cfg)` on the meta device (no random init of ~500M weights) and load `sd`
    strictly in float32. One-line UserError when the file does not fit the architecture."""
    what = cls.__name__
    try:
        with torch.device('meta'):
            net = cls(**cfg)
    except Exception as e:
        raise UserError(f'{flag}: "{path}" does not describe a valid {what} ({e})') from None
    problem = _mismatch({k: tuple(v.shape) for k, v in net.state_dict().items()}, sd)
    if problem:
        raise UserError(f'{flag}: "{path}" does not match the {what} inferred from it: {problem}')
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}   # fp16 files upcast
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def infer(fn, sd, path, flag='--model_path', **kw):
    try:
        return fn(sd, **kw)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f'{flag}: "{path}" does not look like a guided-diffusion UNet state dict '
                        f'({type(e).__name__}: {e})') from None


def image_size_from_attention(cfg):
    """The image side of a UNet: its checkpoint does not record it (the network is convolutional),
    but every released ADM/CM network attends first at 32x32 pixels, so the side is 32 times the
    smallest downsample factor with attention (256 for the released 256x256 models)."""
    if not cfg['attention_resolutions']:
        raise ValueError('no attention layers: cannot tell the image size')
    return ATTENTION_SIDE * min(cfg['attention_resolutions'])


def load_unet(path, flag='--model_path', attention_type='legacy', network_kwargs=None):
    sd = read_state_dict(path, flag)
    cfg = infer(infer_unet_config, sd, path, flag, num_head_channels=HEAD_CHANNELS,
                attention_type=attention_type)
    cfg['image_size'] = infer(image_size_from_attention, cfg, path, flag)
    cfg.update(network_kwargs or {})
    return build_network(UNetModel, cfg, sd, path, flag)


def class_index(class_labels, label_dim):
    """One-hot float labels [B, label_dim] (the models' convention) -> int64 indices for `y`."""
    if not label_dim:
        return None
    if class_labels is None:
        raise ValueError('this model is class-conditional: pass class_labels (one-hot [B, label_dim])')
    return class_labels.argmax(dim=1) if class_labels.ndim == 2 else class_labels.long()


# ----------------------------------------------------------------------------------------------


class ADMModel(DiscreteVPModel):
    supports_fp16 = True

    def __init__(self, net, classifier=None, guidance_rate=DEFAULT_GUIDANCE_RATE, clip_denoised=True, device='cpu'):
        super().__init__(linear_alphas_cumprod(1e-4, 0.02, 1000), device)
        self.net = net.to(self.device)
        self.classifier = classifier.to(self.device) if classifier is not None else None
        self.log_sigma_table(self.device)                   # the guidance's sigma(t) table, before sampling
        self.guidance_rate = float(guidance_rate)
        self.clip_denoised = clip_denoised
        self.img_channels = net.in_channels
        self.img_resolution = net.image_size
        self.label_dim = net.num_classes or 0

    def eps_uncond(self, x_vp, t, y):
        return self.net(x_vp, t, y=y)[:, :self.img_channels].float()

    def classifier_grad(self, x_vp, t, y):
        """grad_{x_vp} log p(y | x_vp, t) of the noisy classifier (in x_vp's dtype, float32 in use)."""
        with torch.enable_grad():
            x_in = x_vp.detach().requires_grad_(True)
            log_p = F.log_softmax(self.classifier(x_in, t), dim=-1)
            return torch.autograd.grad(log_p.gather(1, y[:, None]).sum(), x_in)[0]

    def eps(self, x_vp, t, class_labels=None):
        y = class_index(class_labels, self.label_dim)
        eps = self.eps_uncond(x_vp, t, y)
        if self.classifier is None or self.guidance_rate == 0:
            return eps
        sigma_t = self.sigma(t.detach()).to(dtype=eps.dtype)           # on the device: no host read
        sqrt_one_minus_abar = (sigma_t / (1 + sigma_t ** 2).sqrt())[:, None, None, None]
        return eps - sqrt_one_minus_abar * self.guidance_rate * self.classifier_grad(x_vp, t, y)

    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        d = super().denoise(x, sigma, class_labels=class_labels)
        return d.clamp(-1, 1) if self.clip_denoised else d


def classifier_location(model_location):
    """Where the classifier lies beside the diffusion model (same folder or URL folder): the file
    name with 'diffusion' replaced by 'classifier', or 256x256_classifier.pt."""
    if util.is_url(model_location):
        parsed = urllib.parse.urlparse(model_location)
        name = os.path.basename(parsed.path)
        other = name.replace('diffusion', 'classifier') if 'diffusion' in name else CLASSIFIER_NAME
        return urllib.parse.urlunparse(parsed._replace(path=parsed.path[:len(parsed.path) - len(name)] + other,
                                                       query='', fragment=''))
    name = os.path.basename(model_location)
    other = name.replace('diffusion', 'classifier') if 'diffusion' in name else CLASSIFIER_NAME
    return os.path.join(os.path.dirname(model_location), other)


def check_guidance(guidance_type, guidance_rate):
    if guidance_type not in (None, 'cg'):
        raise UserError(f'--guidance_type: imagenet256 takes classifier guidance only (cg), not "{guidance_type}"')
    rate = DEFAULT_GUIDANCE_RATE if guidance_rate is None else float(guidance_rate)
    if not math.isfinite(rate) or rate < 0:
        raise UserError(f'--guidance_rate: must be a finite number >= 0 for imagenet256 (got {guidance_rate})')
    return rate


def load_imagenet256(model_path=None, device='cpu', guidance_type=None, guidance_rate=None, use_fp16=None,
                     classifier_path=None, network_kwargs=None, classifier_kwargs=None, **kw):
    """`classifier_path` (library use): an explicit classifier file instead of the one beside
    the model. `network_kwargs` / `classifier_kwargs` override inferred constructor arguments."""
    from . import reject_options
    reject_options('imagenet256', kw)
    rate = check_guidance(guidance_type, guidance_rate)
    fp16 = resolve_fp16(use_fp16, device)
    location = model_path or MODEL_URL
    clf_location = (classifier_path or classifier_location(location)) if rate > 0 else None
    if clf_location is not None and not util.is_url(clf_location) and not os.path.isfile(clf_location):
        raise UserError(f'--model_path: the classifier "{clf_location}" must lie beside the diffusion model '
                        f'for classifier guidance; copy it there, or pass --guidance_rate=0')
    flag = '--model_path' if model_path else None
    net_path = fetch(location, 'imagenet256', flag)
    net = load_unet(net_path, network_kwargs=network_kwargs)
    classifier, path = None, None
    if clf_location is not None:
        path = fetch(clf_location, 'imagenet256', flag)
        sd = read_state_dict(path)
        cfg = infer(infer_encoder_config, sd, path, num_head_channels=HEAD_CHANNELS)
        cfg['image_size'] = cfg['image_size'] or net.image_size        # 'adaptive' pool: any size
        cfg.update(classifier_kwargs or {})
        classifier = build_network(EncoderUNetModel, cfg, sd, path)
        if cfg['image_size'] != net.image_size or classifier.in_channels != net.in_channels:
            raise UserError(f'--model_path: the classifier "{path}" is for {cfg["image_size"]}px images, '
                            f'the diffusion model for {net.image_size}px')
    if fp16:
        net.convert_to_fp16()
    model = ADMModel(net, classifier, guidance_rate=rate, device=device)
    model.use_fp16, model.checkpoint_files = fp16, tuple(p for p in (net_path, path) if p is not None)
    return model
