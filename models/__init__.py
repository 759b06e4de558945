"""Model registry: `models.load(dataset_name, ...)` returns a wrapper exposing the denoiser in
sigma (see models/base.py). Families are imported lazily so that, e.g., sampling the analytic
models never imports the latent-diffusion code."""

import importlib

from dnnlib.util import UserError

GUIDANCE_TYPES = ('cg', 'cfg', 'uncond')   # classifier guidance, classifier-free guidance, none
DTYPES = ('float32', 'float16', 'bfloat16')   # --dtype of the diffusers pipelines (torch dtype names)

# dataset_name -> (module, loader function). Each loader takes (model_path=None, device=..., **kw).
REGISTRY = {
    'gmm': ('models.analytic', 'load_gmm'),
    'gmm_wavelet': ('models.analytic', 'load_gmm_wavelet'),
    'digits': ('models.analytic', 'load_digits'),
    'cifar10': ('models.edm', 'load_cifar10'),
    'ffhq': ('models.edm', 'load_ffhq'),
    'afhqv2': ('models.edm', 'load_afhqv2'),
    'imagenet64': ('models.edm', 'load_imagenet64'),
    'lsun_bedroom': ('models.cm', 'load_lsun_bedroom'),
    'imagenet256': ('models.adm', 'load_imagenet256'),
    'lsun_bedroom_ldm': ('models.ldm', 'load_lsun_bedroom_ldm'),
    'ffhq_ldm': ('models.ldm', 'load_ffhq_ldm'),
    'ms_coco': ('models.sd', 'load_ms_coco'),
    'diffusers': ('models.diffusers_pipeline', 'load_diffusers'),
}


# The built-in models with an exact ODE solution (`exact(x, sigma_from, sigma_to)`).
ANALYTIC = ('gmm', 'gmm_wavelet', 'digits')


def names():
    return list(REGISTRY)


def load(dataset_name, model_path=None, device='cpu', **kw):
    if dataset_name not in REGISTRY:
        raise UserError(f'--dataset_name: unknown model "{dataset_name}"; choose one of {", ".join(REGISTRY)}')
    module_name, fn_name = REGISTRY[dataset_name]
    fn = getattr(importlib.import_module(module_name), fn_name)
    kw = {k: v for k, v in kw.items() if v is not None}
    return fn(model_path=model_path, device=device, **kw)


def reject_options(dataset_name, kw, allowed=()):
    """One clear error for options a model family does not take (e.g. --prompt for cifar10)."""
    extra = sorted(k for k, v in kw.items() if v is not None and k not in allowed)
    if extra:
        flags = ', '.join('--' + k for k in extra)
        raise UserError(f'{flags}: not used by dataset_name "{dataset_name}"')
