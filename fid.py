"""Frechet Inception Distance (FID), compatible with NVlabs' EDM: the same Inception-v3 detector,
the same reference-statistics files (.npz with float64 `mu` and `sigma`) and the same formula.

    # FID of generated images against reference statistics (a file or a URL)
    python fid.py calc --images=samples/cifar10/ipndm_nfe6 \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=4 fid.py calc --images=PATH --ref=REF.npz

    # Reference statistics of a dataset (a folder tree or a zip of PNG/JPEG images)
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz

Unlike the paper's script, any number of images (at least 2) is accepted. The statistics are
the same for any number of processes (see torch_utils/image_folder.py).
"""

import io
import os
import pickle
import sys
import warnings

import click
import numpy as np
import scipy.linalg
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import image_folder
from torch_utils import misc

# NVlabs' PyTorch translation of TensorFlow's inception-2015-12-05 graph (the detector of EDM,
# StyleGAN3 and the GITS paper): a pickle whose object is a TorchScript module called as
# detector(uint8 NCHW RGB images at their own resolution, return_features=True) -> [N, 2048].
DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/'
                'metrics/inception-2015-12-05.pkl')


def cache_dir():
    """Downloaded detectors and reference statistics: <GITS_CACHE_DIR or ~/.cache/gits>/metrics."""
    return os.path.join(dnnlib.util.default_cache_dir(), 'metrics')


# ----------------------------------------------------------------------------------------------
# Detector.

class _DetectorPickler(pickle.Pickler):
    """Pickles a TorchScript module as `torch.jit.load(io.BytesIO(<its TorchScript archive>))`,
    so that a plain `pickle.load` returns the module again with nothing but torch installed
    (TorchScript modules refuse ordinary pickling)."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.jit.ScriptModule):
            buf = io.BytesIO()
            torch.jit.save(obj, buf)
            return torch.jit.load, (io.BytesIO(buf.getvalue()),)
        return NotImplemented


def save_detector(module, path):
    """Write a feature network usable with --detector: `module` is a TorchScript module (e.g.
    torch.jit.script(net)) whose forward(x, return_features: bool) takes uint8 [N, 3, H, W] and
    returns float features [N, F]."""
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError('save_detector expects a TorchScript module (torch.jit.script or torch.jit.trace)')
    buf = io.BytesIO()
    _DetectorPickler(buf, protocol=4).dump(module)
    misc.atomic_write_bytes(path, buf.getvalue())


def load_detector(url_or_path, device):
    path = dist.fetch_file(url_or_path, '--detector', cache_dir())
    try:
        with open(path, 'rb') as f, warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)    # torch.jit.load's deprecation notice
            detector = pickle.load(f)
    except Exception as e:      # anything a foreign pickle can raise
        raise UserError(f'--detector: cannot load "{url_or_path}" ({type(e).__name__}: {e})') from None
    if not callable(detector):
        raise UserError(f'--detector: "{url_or_path}" holds a {type(detector).__name__}, not a callable network')
    if isinstance(detector, torch.nn.Module):
        detector = detector.to(device).eval()     # gradients are off: calls run under no_grad
    return detector


def feature_fn(detector, device, num_features=None):
    """fn(images, indices) -> CPU features [N, F] for image_folder.gathered, with shape checks."""
    def fn(images, _indices):
        with torch.no_grad():
            feats = detector(images.to(device), return_features=True)
        if not (isinstance(feats, torch.Tensor) and feats.ndim == 2 and feats.shape[0] == images.shape[0]):
            shape = list(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise UserError(f'--detector: returned {shape} for {images.shape[0]} images; expected [N, F] features')
        if num_features is not None and feats.shape[1] != num_features:
            raise UserError(f'--ref: the statistics have {num_features} features but the detector gives '
                            f'{feats.shape[1]}; use the detector they were made with')
        return feats.detach().cpu()
    return fn


# ----------------------------------------------------------------------------------------------
# Statistics.

class FeatureStats:
    """Running sums of features in float64; mean and covariance as EDM computes them (the
    covariance with the unbiased 1 / (N - 1) factor)."""

    def __init__(self, device='cpu'):
        self.device = device
        self.n = 0
        self.sum = None
        self.sum_sq = None

    def add(self, feats):
        f = feats.to(device=self.device, dtype=torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=self.device)
            self.sum_sq = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=self.device)
        self.sum += f.sum(0)
        self.sum_sq += f.T @ f
        self.n += f.shape[0]

    def mean_cov(self):
        mu = self.sum / self.n
        sigma = (self.sum_sq - torch.outer(mu, mu) * self.n) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def image_stats(folder, indices, detector, device, batch=64, workers=3, num_features=None):
    """(mu, sigma) of the detector's features of folder images `indices`, on rank 0 (None
    elsewhere). Every process must call it."""
    dataset = image_folder.ImageDataset(folder, size=folder.image_size(indices[0]),
                                        reference=folder.names[indices[0]])
    batches = image_folder.split_batches(indices, batch)
    stats = FeatureStats(device)
    fn = feature_fn(detector, device, num_features)
    for _, feats in image_folder.gathered(dataset, batches, fn, workers=workers, desc='Features'):
        if dist.get_rank() == 0:        # only rank 0 needs the totals
            stats.add(feats)
    return stats.mean_cov() if dist.get_rank() == 0 else (None, None)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the real part (sqrtm of
    a product of covariances can carry tiny imaginary parts), as EDM computes it."""
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', scipy.linalg.LinAlgWarning)
        s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    if any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
        # One line instead of scipy's two: expected with fewer images than features.
        print('Warning: the covariance product is singular (fewer images than features?); the FID may be '
              'inaccurate in its last digits', file=sys.stderr, flush=True)
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


def load_stats(url_or_path, flag='--ref'):
    path = dist.fetch_file(url_or_path, flag, cache_dir())
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f'{flag}: "{url_or_path}" is not a .npz statistics file ({e})') from None
    missing = [k for k in ('mu', 'sigma') if k not in stats]
    if missing:
        raise UserError(f'{flag}: "{url_or_path}" lacks {" and ".join(missing)}; a statistics file holds '
                        f'arrays mu [F] and sigma [F, F] (found: {", ".join(sorted(stats)) or "nothing"})')
    mu, sigma = stats['mu'].astype(np.float64), stats['sigma'].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f'{flag}: "{url_or_path}" has mu {list(mu.shape)} and sigma {list(sigma.shape)}; '
                        f'expected [F] and [F, F]')
    return mu, sigma


def save_stats(path, mu, sigma):
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))
        misc.atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise UserError(f'--dest: cannot write "{path}": {e.strerror}') from None


def select_images(path, num, seed, flag):
    folder = image_folder.ImageFolder(path, flag=flag)
    indices = image_folder.select(len(folder), num, seed)
    if len(indices) < 2:
        raise UserError(f'{flag}: found {len(indices)} image in "{path}"; statistics need at least 2')
    return folder, indices


# ----------------------------------------------------------------------------------------------
# Command line.

def common_options(fn):
    options = [
        click.option('--num', type=click.IntRange(min=2), default=None,
                     help='Use a random subset of this many images (chosen by --seed, as EDM does) [default: all]'),
        click.option('--seed', type=int, default=0, help='Seed of the random subset'),
        click.option('--batch', type=click.IntRange(min=1), default=64, help='Images per detector call and process'),
        click.option('--workers', type=click.IntRange(min=0), default=3, help='Image-decoding worker processes per process'),
        click.option('--detector', type=str, default=DETECTOR_URL, help='Feature network pickle: path or URL [default: Inception-v3]'),
        click.option('--device', type=str, default=None, help='torch device [default: cuda if available, else cpu]'),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group()
def main():
    """Frechet Inception Distance, compatible with NVlabs' EDM (fid.py calc / fid.py ref)."""


@main.command()
@click.option('--images', type=str, required=True, help='Folder (searched recursively) or zip of PNG/JPEG images')
@click.option('--ref', type=str, required=True, help='Reference statistics .npz (mu, sigma): path or URL')
@common_options
def calc(images, ref, num, seed, batch, workers, detector, device):
    """FID of a set of images against reference statistics (printed as the last line)."""
    dist.check_device(device)
    folder, indices = select_images(images, num, seed, '--images')
    device = dist.init(device)
    dist.print0(f'Loading reference statistics from "{ref}"...')
    mu_ref, sigma_ref = load_stats(ref)
    dist.print0(f'Loading detector from "{detector}"...')
    net = load_detector(detector, device)
    dist.print0(f'Computing features of {len(indices)} images from "{images}"...')
    mu, sigma = image_stats(folder, indices, net, device, batch=batch, workers=workers, num_features=mu_ref.shape[0])
    if dist.get_rank() == 0:
        print(f'{frechet_distance(mu, sigma, mu_ref, sigma_ref):g}', flush=True)
    dist.barrier()
    dist.shutdown()


@main.command()
@click.option('--data', type=str, required=True, help='Dataset: folder (searched recursively) or zip of PNG/JPEG images')
@click.option('--dest', type=str, required=True, help='Output .npz file (mu, sigma in float64)')
@common_options
def ref(data, dest, num, seed, batch, workers, detector, device):
    """Reference statistics of a dataset, for `fid.py calc --ref`."""
    dist.check_device(device)
    dnnlib.util.check_writable_file(dest, '--dest')
    folder, indices = select_images(data, num, seed, '--data')
    device = dist.init(device)
    dist.print0(f'Loading detector from "{detector}"...')
    net = load_detector(detector, device)
    dist.print0(f'Computing features of {len(indices)} images from "{data}"...')
    mu, sigma = image_stats(folder, indices, net, device, batch=batch, workers=workers)
    if dist.get_rank() == 0:
        save_stats(dest, mu, sigma)
        print(f'Saved reference statistics of {len(indices)} images to "{dest}"', flush=True)
    dist.barrier()
    dist.shutdown()


if __name__ == '__main__':
    dnnlib.run_cli(main)
