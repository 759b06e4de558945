"""Denoisers fitted to a data set: the optimal (kernel) denoiser of its empirical distribution and
analytic scores (a Gaussian, a low-rank Gaussian, a per-class mixture of Gaussians).

Each is a Model: `denoise(x, sigma)` in EDM's parametrisation, so every solver and the trajectory
tools run on it as on a network. All compute in float64 and return the input's dtype.

- KernelDenoiser: the data set as a sum of point masses. Its denoiser is the posterior mean
  D*(x; s) = sum_i w_i(x) y_i with w = softmax_i(-|x - y_i|^2 / (2 s^2)), the best possible L2
  denoiser of that set (Karras et al. 2022, eq. 57); its ODE lands on training points.
- GaussianDenoiser: N(mean, C) with C = V diag(lam) V^T + nu (I - V V^T) (eigenpairs V, lam kept,
  the rest of the spectrum replaced by one variance nu). The denoiser is linear:
  D = mean + C (C + s^2 I)^-1 (x - mean), i.e. eigenvalue-wise shrinkage lam / (lam + s^2).
- MixtureDenoiser: sum_k pi_k N(mean_k, C_k); D = sum_k w_k(x) D_k(x), the weights the posterior
  class probabilities (log-densities of N(mean_k, C_k + s^2 I), normalised by logsumexp).

`read_dataset` reads a `--data` zip or folder the way `fid.py ref` does (torch_utils.image_folder)
and, where the data set has them, its labels from dataset.json (EDM's dataset_tool layout:
{"labels": [["00000/img00000000.png", 6], ...]}).
"""

import io
import json
import math
import zipfile

import numpy as np
import torch

from dnnlib.util import UserError
from torch_utils import image_folder
from .base import Model

_DATA_CHUNK = 4096   # data points per block of the kernel denoiser: bounds its [B, chunk] temporaries


# ----------------------------------------------------------------------------------------------
# Data sets.

def read_dataset(path, shape, flag='--data'):
    """(images [N, *shape] float64 in [-1, 1], labels int64 [N] or None) of a zip or folder of
    PNG/JPEG images, in ImageFolder's sorted order. Images must have the model's resolution; a
    one-channel model takes gray images (all three channels equal once read as RGB)."""
    channels, height, width = shape
    folder = image_folder.ImageFolder(path, flag=flag)
    if channels not in (1, 3):
        raise UserError(f'{flag}: the model has {channels} channels; data sets hold 1- or 3-channel images')
    images = []
    for index, name in enumerate(folder.names):
        try:
            rgb = np.asarray(folder.open_image(index))                       # [H, W, 3] uint8
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f'{flag}: cannot read image "{name}" ({e})') from None
        if rgb.shape[:2] != (height, width):
            raise UserError(f'{flag}: "{name}" is {rgb.shape[1]}x{rgb.shape[0]}; the model takes '
                            f'{width}x{height} images')
        if channels == 1:
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise UserError(f'{flag}: "{name}" is a color image; the model takes gray images')
            rgb = rgb[..., :1]
        images.append(torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float64)))
    data = torch.stack(images) / 127.5 - 1
    return data, read_labels(folder, flag)


def read_labels(folder, flag='--data'):
    """Labels of folder.names from its dataset.json, or None where it has none (no file, or
    "labels": null as dataset_tool writes for unlabelled sets)."""
    if 'dataset.json' not in folder.files:
        return None
    try:
        labels = json.loads(folder.read('dataset.json')).get('labels')
    except (ValueError, AttributeError) as e:
        raise UserError(f'{flag}: dataset.json is not a JSON object ({e})') from None
    if labels is None:
        return None
    try:
        table = {str(name): int(label) for name, label in labels}
    except (TypeError, ValueError):
        raise UserError(f'{flag}: dataset.json "labels" must be a list of [file name, integer label] pairs') from None
    missing = [n for n in folder.names if n not in table]
    if missing:
        raise UserError(f'{flag}: dataset.json has no label for "{missing[0]}" ({len(missing)} images lack one)')
    return torch.tensor([table[n] for n in folder.names], dtype=torch.int64)


def dataset_zip(images, labels=None):
    """Bytes of a zip of `images` ([N, C, H, W] in [-1, 1], C = 1 or 3) as PNGs in dataset_tool's
    layout (00000/img00000000.png, ...), with dataset.json holding `labels` (or null)."""
    from PIL import Image
    pixels = (images.to(torch.float64) * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu().numpy()
    names, buf = [], io.BytesIO()
    with zipfile.ZipFile(buf, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, img in enumerate(pixels):
            name = f'{i // 1000:05d}/img{i:08d}.png'
            png = io.BytesIO()
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(png, format='png')
            z.writestr(name, png.getvalue())
            names.append(name)
        table = None if labels is None else [[n, int(l)] for n, l in zip(names, labels)]
        z.writestr('dataset.json', json.dumps(dict(labels=table)))
    return buf.getvalue()


def digits_dataset(model, num=None, seed=0):
    """The digits model's data set itself (every image, its digit as the label): its exact
    denoiser is this set's optimal one."""
    from sklearn.datasets import load_digits
    from .analytic import load_digits_data
    return load_digits_data(), torch.from_numpy(load_digits().target.astype(np.int64))


def mixture_dataset(model, num, seed=0):
    """`num` exact draws of a Gaussian-mixture model, labelled by their component."""
    return model.sample_data(num, generator=torch.Generator().manual_seed(seed), return_labels=True)


DATASETS = {   # analytic model -> (draw(model, num, seed) -> (images, labels), whether --num applies)
    'digits': (digits_dataset, False),
    'gmm': (mixture_dataset, True),
    'gmm_wavelet': (mixture_dataset, True),
}


# ----------------------------------------------------------------------------------------------
# Denoisers.

class FittedModel(Model):
    """A denoiser fitted to data of one sample shape; float64 inside."""
    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, shape, device='cpu'):
        self.img_channels, self.img_resolution = shape[0], shape[-1]
        self.device = torch.device(device)

    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        flat = x.reshape(x.shape[0], -1).to(device=self.device, dtype=torch.float64)
        return self._denoise64(flat, float(sigma)).reshape(x.shape).to(device=x.device, dtype=x.dtype)


class KernelDenoiser(FittedModel):
    """The optimal denoiser of the empirical distribution of `data` [N, ...]: a softmax-weighted
    mean of the data points, streamed over blocks of the data set (a running logsumexp), so memory
    is [B, chunk] whatever N."""

    def __init__(self, data, device='cpu', chunk=_DATA_CHUNK):
        super().__init__(data.shape[1:], device)
        self.data = data.reshape(data.shape[0], -1).to(device=self.device, dtype=torch.float64)
        self.half_sq = 0.5 * self.data.square().sum(-1)
        self.chunk = int(chunk)

    def _denoise64(self, x, sigma):
        # -|x - y|^2 / (2 s^2) = (x.y - |y|^2 / 2) / s^2 - |x|^2 / (2 s^2): the last term is the
        # same for every y and cancels in the softmax.
        peak = torch.full([x.shape[0], 1], -math.inf, dtype=torch.float64, device=x.device)
        total = torch.zeros([x.shape[0], 1], dtype=torch.float64, device=x.device)
        acc = torch.zeros_like(x)
        for start in range(0, self.data.shape[0], self.chunk):
            y = self.data[start:start + self.chunk]
            logits = (x @ y.T - self.half_sq[start:start + self.chunk]) / sigma ** 2      # [B, chunk]
            new_peak = torch.maximum(peak, logits.max(1, keepdim=True).values)
            rescale = torch.exp(peak - new_peak)          # earlier blocks' sums, to the new peak
            w = torch.exp(logits - new_peak)
            total = total * rescale + w.sum(1, keepdim=True)
            acc = acc * rescale + w @ y
            peak = new_peak
        return acc / total


class GaussianDenoiser(FittedModel):
    """N(mean, V diag(lam) V^T + nu (I - V V^T)): `mean` [D], orthonormal columns V [D, r],
    `lam` [r] >= 0, `nu` >= 0 the variance of the rest of the space (0: none there)."""

    def __init__(self, shape, mean, basis, lam, nu, device='cpu'):
        super().__init__(shape, device)
        self.mean = mean.to(self.device, torch.float64)
        self.basis = basis.to(self.device, torch.float64)
        self.lam = lam.to(self.device, torch.float64).clamp_min(0)
        self.nu = float(max(nu, 0.0))

    def _parts(self, x, sigma):
        """(centred x, its coordinates z in the basis, the residual's squared norm)."""
        c = x - self.mean
        z = c @ self.basis
        return c, z, (c.square().sum(-1) - z.square().sum(-1)).clamp_min(0)

    def _denoise64(self, x, sigma):
        c, z, _ = self._parts(x, sigma)
        rest = self.nu / (self.nu + sigma ** 2)
        return self.mean + rest * c + (z * (self.lam / (self.lam + sigma ** 2) - rest)) @ self.basis.T

    def log_density(self, x, sigma):
        """log N(x; mean, C + sigma^2 I) [B] (the noisy marginal), up to the -D/2 log(2 pi) that
        every Gaussian of the same dimension shares."""
        _, z, res = self._parts(x, sigma)
        var, rest = self.lam + sigma ** 2, self.nu + sigma ** 2
        dim, rank = self.mean.shape[0], self.lam.shape[0]
        return -0.5 * (torch.log(var).sum() + (dim - rank) * math.log(rest)
                       + (z.square() / var).sum(-1) + res / rest)


class MixtureDenoiser(FittedModel):
    """sum_k pi_k N(mean_k, C_k): a list of GaussianDenoiser and their log-weights [K]."""

    def __init__(self, shape, components, log_weights, device='cpu'):
        super().__init__(shape, device)
        self.components = components
        self.log_weights = log_weights.to(self.device, torch.float64)

    def _denoise64(self, x, sigma):
        logits = torch.stack([c.log_density(x, sigma) for c in self.components], 1) + self.log_weights
        w = torch.softmax(logits, 1)                                       # posterior class weights [B, K]
        return sum(w[:, k:k + 1] * c._denoise64(x, sigma) for k, c in enumerate(self.components))


# ----------------------------------------------------------------------------------------------
# Fitting (maximum likelihood: the covariance with 1 / N).

def fit_gaussian(data, rank=None, device='cpu'):
    """The Gaussian of `data` [N, ...]: its mean and covariance, from the thin SVD of the centred
    data (no D x D matrix when N < D: the covariance is then zero outside the data's span). With
    `rank`, the low-rank Gaussian: the top `rank` eigenpairs, and the mean of the other eigenvalues
    (over all D dimensions) as one isotropic variance for the rest (probabilistic PCA's fit)."""
    flat = data.reshape(data.shape[0], -1).to(torch.float64)
    mean = flat.mean(0)
    _, s, vh = torch.linalg.svd((flat - mean) / math.sqrt(flat.shape[0]), full_matrices=False)
    lam, basis = s.square(), vh.T
    nu = 0.0
    if rank is not None and rank < lam.shape[0]:
        dim = flat.shape[1]
        nu = float(lam[rank:].sum()) / (dim - rank)
        lam, basis = lam[:rank], basis[:, :rank]
    return GaussianDenoiser(data.shape[1:], mean, basis, lam, nu, device)


def fit_mixture(data, labels, rank=None, device='cpu'):
    """A Gaussian per label (fit_gaussian of its points), weighted by its share of the data."""
    classes = sorted(set(labels.tolist()))
    components = [fit_gaussian(data[labels == k], rank, device) for k in classes]
    counts = torch.tensor([int((labels == k).sum()) for k in classes], dtype=torch.float64)
    return MixtureDenoiser(data.shape[1:], components, torch.log(counts / counts.sum()), device)


def fit_analytic(kind, data, labels=None, rank=None, device='cpu'):
    """The analytic denoiser `kind` (ANALYTIC_FITS) fitted to the data set."""
    return ANALYTIC_FITS[kind](data, labels, rank, device)


ANALYTIC_FITS = {     # --analytic name -> fit(data, labels, rank, device)
    'gaussian': lambda data, labels, rank, device: fit_gaussian(data, None, device),
    'lowrank': lambda data, labels, rank, device: fit_gaussian(data, rank, device),
    'mixture': lambda data, labels, rank, device: fit_mixture(data, labels, None, device),
}
