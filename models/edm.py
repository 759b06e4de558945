"""EDM checkpoints (Karras et al. 2022): cifar10, ffhq and afhqv2 (DDPM++, unconditional) and
imagenet64 (ADM, class-conditional with 1000 one-hot labels).

A checkpoint is NVlabs' snapshot pickle, a dict whose 'ema' entry is the preconditioned network
D(x; sigma, class_labels). Its classes are persistent: the pickle carries their source, which
torch_utils.persistence executes on load, so the network needs no code of ours. The file is
downloaded once into ./src/<dataset_name>/ and used from there without network access.
"""

import functools
import os
import pickle
import zipfile

import torch

from dnnlib import util
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import persistence
from .base import Model, resolve_fp16

URLS = {
    'cifar10': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl',
    'ffhq': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-ffhq-64x64-uncond-vp.pkl',
    'afhqv2': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-afhqv2-64x64-uncond-vp.pkl',
    'imagenet64': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl',
}
SRC_ROOT = 'src'                 # downloads go to ./src/<dataset_name>/<file name of the URL>
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0   # EDM's sampling range; the pickles say only 0..inf
NET_ATTRIBUTES = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'use_fp16')


class EDMModel(Model):
    """A loaded EDM network seen as the project's denoiser interface."""
    supports_fp16 = True

    def __init__(self, net, device='cpu', use_fp16=False):
        self.device = torch.device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)
        self.net.use_fp16 = bool(use_fp16)      # the network casts activations itself (CUDA only)
        self.use_fp16 = bool(use_fp16)
        self.img_channels = int(net.img_channels)
        self.img_resolution = int(net.img_resolution)
        self.label_dim = int(net.label_dim)
        # As EDM's generate.py: the default range, narrowed to what the network supports
        # (VPPrecond knows its own limits; EDMPrecond reports 0..inf).
        self.sigma_min = max(SIGMA_MIN, float(net.sigma_min))
        self.sigma_max = min(SIGMA_MAX, float(net.sigma_max))

    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.to(device=x.device, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        else:      # a number is filled in on the device: copying it there would wait for the queue
            sigma = torch.full([x.shape[0]], float(sigma), dtype=torch.float64, device=x.device)
        return self.net(x, sigma, class_labels).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Loading.

def load_edm(dataset_name, model_path=None, device='cpu', use_fp16=None, **kw):
    from . import reject_options
    reject_options(dataset_name, kw)
    device = torch.device(device)
    resolve_fp16(use_fp16, device)         # refuse --use_fp16=True off CUDA before any download
    path, cached = checkpoint_file(dataset_name, model_path)
    net = load_network(path, cached=cached, flag='--model_path' if model_path is not None else '--dataset_name')
    model = EDMModel(net, device=device, use_fp16=resolve_fp16(use_fp16, device, default=bool(getattr(net, 'use_fp16', False))))
    model.checkpoint_files = (path,)
    return model


load_cifar10 = functools.partial(load_edm, 'cifar10')
load_ffhq = functools.partial(load_edm, 'ffhq')
load_afhqv2 = functools.partial(load_edm, 'afhqv2')
load_imagenet64 = functools.partial(load_edm, 'imagenet64')




def checkpoint_file(dataset_name, model_path=None):
    """(local path, is_cached_download). URLs (the default one, or --model_path=http(s)://...) are
    downloaded into ./src/<dataset_name>/; local paths and file:// URLs are used in place."""
    source = URLS[dataset_name] if model_path is None else str(model_path)
    cache_dir = os.path.abspath(os.path.join(SRC_ROOT, dataset_name))
    try:
        path = fetch(source, cache_dir)
    except UserError as e:
        if model_path is None:
            raise
        raise UserError(f'--model_path: {e}') from None
    cached = util.is_url(source) and not source.startswith('file:')
    return path, cached


def fetch(source, cache_dir):
    """util.resolve_path with only rank 0 downloading under torchrun (dist.rank0_first)."""
    return dist.rank0_first(lambda: util.resolve_path(source, cache_dir=cache_dir, progress=dist.get_rank() == 0))


class InvalidCheckpoint(Exception):
    pass


def load_network(path, cached=False, flag='--model_path'):
    """The 'ema' network of an EDM snapshot pickle. A file that is not one gives a UserError;
    if it is our own cached download it is first moved aside to <file>.invalid, so that the next
    run downloads it again instead of failing on it forever (the bad copy is kept to inspect)."""
    try:
        return read_snapshot(path)
    except InvalidCheckpoint as e:
        reason = str(e)
    if not cached:
        raise UserError(f'{flag}: {path} is not a valid EDM checkpoint ({reason})')
    aside = path + '.invalid'
    if dist.get_rank() == 0:
        try:
            os.replace(path, aside)
        except OSError:
            aside = None
    what_now = (f'moved it to {aside}; run again to download it anew' if aside
                else 'delete it and run again to download it anew')
    raise UserError(f'{flag}: the cached file {path} is not a valid EDM checkpoint ({reason}); {what_now}')


def read_snapshot(path):
    try:
        with open(path, 'rb') as f:
            data = persistence.load(f)
    except ImportError as e:
        # Not the file's fault: the embedded source needs a module this environment lacks.
        raise UserError(f'loading {path} needs the Python module "{e.name}", which is not installed') from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:      # pickle raises many types for corrupt input (EOFError, KeyError, ...)
        raise InvalidCheckpoint(describe_unpickling_error(path, e)) from None
    if not isinstance(data, dict) or 'ema' not in data:
        kind = f'a dict with keys {sorted(map(str, data))[:8]}' if isinstance(data, dict) else type(data).__name__
        raise InvalidCheckpoint(f'expected a snapshot dict with the key "ema", found {kind}')
    net = data['ema']
    missing = [a for a in NET_ATTRIBUTES if not hasattr(net, a)]
    if not isinstance(net, torch.nn.Module) or missing:
        raise InvalidCheckpoint(f'"ema" is a {type(net).__name__} without {", ".join(missing) or "a forward"}, '
                                'not an EDM network')
    return net


def describe_unpickling_error(path, e):
    if isinstance(e, EOFError) or 'truncated' in str(e):
        return 'the file ends early: an incomplete download or copy'
    if zipfile.is_zipfile(path):
        return 'it is a zip archive (torch.save format), not an EDM pickle'
    if isinstance(e, pickle.UnpicklingError):
        return f'not a Python pickle: {first_line(e)}'
    return f'unpickling failed with {type(e).__name__}: {first_line(e)}'


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
