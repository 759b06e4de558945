"""Embedded analytic models with exact denoisers: no download, and the probability-flow ODE can be
solved to high accuracy (`exact`), so solver errors are measured against the true solution.

- gmm:    a 10-component isotropic Gaussian mixture in CIFAR-10's shape (3x32x32).
- gmm_wavelet: a 10-component Gaussian mixture in the same shape with image-like spectra (diagonal
          in the Haar wavelet basis, power decaying with frequency), so that the trajectories
          curve inside a component (gmm's are straight lines there).
- digits: the empirical distribution of scikit-learn's 1797 8x8 digits, scaled to [-1, 1].

All three compute in float64 and return the input's dtype. Every reduction is done per sample
(broadcast, then sum over the sample's own axes, no matrix products across the batch), so a
sample's output does not depend on which other samples share its batch.
"""

import math

import numpy as np
import torch

from dnnlib.util import UserError
from .base import Model

_CHUNK = 32      # rows per chunk, bounds the [chunk, components, dims] temporaries


class AnalyticModel(Model):
    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, device='cpu'):
        self.device = torch.device(device)

    def _denoise64(self, x, sigma):
        raise NotImplementedError

    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        sigma = float(sigma)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        out = torch.cat([self._denoise64(chunk, sigma) for chunk in flat.split(_CHUNK)])
        return out.reshape(x.shape).to(x.dtype)

    def exact(self, x, sigma_from, sigma_to, rtol=1e-9, atol=1e-9):
        """The ODE dx/dsigma = (x - D(x; sigma)) / sigma solved from sigma_from to sigma_to."""
        return solve_pf_ode(self.denoise, x, sigma_from, sigma_to, rtol=rtol, atol=atol)


def _smooth_patterns(num, channels, coarse, size, generator):
    """`num` smooth image-like patterns [num, channels, size, size]: uniform noise in [-1, 1] on a
    coarse x coarse grid, upsampled bilinearly (a convex combination: values stay in [-1, 1])."""
    grid = torch.rand([num, channels, coarse, coarse], generator=generator, dtype=torch.float64) * 2 - 1
    return torch.nn.functional.interpolate(grid, size=(size, size), mode='bilinear', align_corners=False)


class GaussianMixture(AnalyticModel):
    img_channels = 3
    img_resolution = 32

    def __init__(self, device='cpu', num_components=10, seed=0):
        super().__init__(device)
        g = torch.Generator().manual_seed(seed)
        means = _smooth_patterns(num_components, self.img_channels, 4, self.img_resolution, g)
        self.means = means.reshape(num_components, -1).to(self.device)
        self.stds = (0.1 + 0.4 * torch.rand([num_components], generator=g, dtype=torch.float64)).to(self.device)
        self.log_weights = torch.full([num_components], -math.log(num_components), dtype=torch.float64,
                                      device=self.device)

    def _denoise64(self, x, sigma):
        var = self.stds ** 2 + sigma ** 2                                   # [K]
        diff = x[:, None, :] - self.means[None]                           # [B, K, D]
        sq = diff.square().sum(-1)                                        # [B, K]
        dim = x.shape[1]
        logits = self.log_weights - 0.5 * dim * torch.log(var) - 0.5 * sq / var
        w = torch.softmax(logits, dim=1)                                  # posterior weights
        shrink = self.stds ** 2 / var                                     # [K]
        comp = self.means[None] + shrink[None, :, None] * diff            # E[x0 | x, k]
        return (w[:, :, None] * comp).sum(1)

    def sample_data(self, num, generator=None, return_labels=False):
        """Exact samples from the mixture (for tests of the distribution); with `return_labels`,
        also each sample's component [num]."""
        k = torch.randint(len(self.stds), [num], generator=generator)
        eps = torch.randn([num, self.means.shape[1]], generator=generator, dtype=torch.float64)
        out = (self.means[k] + self.stds[k, None] * eps).reshape(num, *self.shape)
        return (out, k) if return_labels else out


def _sum_diff(x, dim):
    """(x_0 + x_1, x_0 - x_1) of the two halves of dimension `dim` (size 2), stacked in its place."""
    a, b = x.unbind(dim)
    return torch.stack([a + b, a - b], dim)


def haar2d(x):
    """Orthonormal 2-D Haar wavelet transform of square images [..., n, n] (n a power of 2), in the
    in-place pyramid layout: the top-left n/2 x n/2 block holds the pair-sums (the next level's
    input), the other three quadrants the differences along columns, rows and both. Sums and
    differences only: orthonormal up to round-off, and elementwise, so a sample's coefficients do
    not depend on its batch."""
    out = x.clone()
    size = x.shape[-1]
    while size > 1:
        h = size // 2
        pairs = out[..., :size, :size].unflatten(-1, (h, 2)).unflatten(-3, (h, 2))    # [..., i, p, j, q]
        mixed = _sum_diff(_sum_diff(pairs, -3), -1)                               # p, q: sum / difference
        out[..., :size, :size] = mixed.movedim(-3, -4).movedim(-1, -2).flatten(-4, -3).flatten(-2) * 0.5
        size = h
    return out


def ihaar2d(y):
    """Inverse (= transpose) of haar2d."""
    out = y.clone()
    size = 2
    while size <= y.shape[-1]:
        h = size // 2
        mixed = out[..., :size, :size].unflatten(-1, (2, h)).unflatten(-3, (2, h))   # [..., p, i, q, j]
        pairs = _sum_diff(_sum_diff(mixed, -4), -2)
        out[..., :size, :size] = pairs.movedim(-4, -3).movedim(-2, -1).flatten(-4, -3).flatten(-2) * 0.5
        size *= 2
    return out


def haar_levels(n):
    """Level of every coefficient of haar2d's layout [n, n]: 0 for the overall average, j for the
    details on a 2^(j-1) x 2^(j-1) grid (log2(n) the finest, single-pixel scale)."""
    levels = torch.zeros([n, n], dtype=torch.int64)
    size, level = n, int(math.log2(n))
    while size > 1:
        levels[:size, :size] = level
        size, level = size // 2, level - 1
    levels[0, 0] = 0
    return levels


class WaveletMixture(AnalyticModel):
    """A Gaussian mixture in CIFAR-10's shape whose components have image-like spectra: diagonal in
    the orthonormal Haar basis (per channel), with the coefficient standard deviation halving from
    one level to the next finer one (natural images' 1/f^2 power spectrum), times a per-component,
    per-coefficient factor in [1/2, 2], plus a floor. In wavelet coordinates y = H x every component
    is a diagonal Gaussian N(m_k, diag(lam_k)), so the denoiser is gmm's, coordinate by coordinate:
    D = H^T sum_k w_k (m_k + lam_k / (lam_k + sigma^2) (y - m_k)), w_k by logsumexp. A coordinate of
    a component moves like sqrt(lam + sigma^2), so coarse ones stop moving before fine ones: the
    trajectories turn over sigma ~ 2.5 .. 0.02, where gmm's are straight lines inside a component."""
    img_channels = 3
    img_resolution = 32

    def __init__(self, device='cpu', num_components=10, seed=2, coarse_std=2.5, decay=0.5, floor=0.02):
        super().__init__(device)
        g = torch.Generator().manual_seed(seed)
        n = self.img_resolution
        means = 0.6 * _smooth_patterns(num_components, self.img_channels, 4, n, g)
        factor = 2 ** (torch.rand([num_components, self.img_channels, n, n], generator=g, dtype=torch.float64) * 2 - 1)
        std = coarse_std * decay ** haar_levels(n).to(torch.float64) * factor
        self.means = haar2d(means).reshape(num_components, -1).to(self.device)       # m_k, wavelet coordinates
        self.variances = (std ** 2 + floor ** 2).reshape(num_components, -1).to(self.device)
        self.log_weights = torch.full([num_components], -math.log(num_components), dtype=torch.float64,
                                      device=self.device)

    def to_wavelet(self, x):
        """Wavelet coordinates [B, D] of flat images [B, D]."""
        return haar2d(x.reshape(-1, *self.shape)).reshape(x.shape[0], -1)

    def from_wavelet(self, y):
        return ihaar2d(y.reshape(-1, *self.shape)).reshape(y.shape[0], -1)

    def _denoise64(self, x, sigma):
        var = self.variances + sigma ** 2                                    # [K, D]
        inv_var = var.reciprocal()                                           # products, not quotients, over [B, K, D]
        diff = self.to_wavelet(x)[:, None, :] - self.means[None]            # [B, K, D]
        logits = self.log_weights - 0.5 * (torch.log(var).sum(-1) + (diff.square() * inv_var).sum(-1))
        w = torch.softmax(logits, dim=1)                                     # posterior weights
        comp = torch.addcmul(self.means, self.variances * inv_var, diff)    # E[y0 | y, k]
        return self.from_wavelet((w[:, :, None] * comp).sum(1))

    def sample_data(self, num, generator=None, return_labels=False):
        """Exact samples from the mixture (for tests of the distribution); with `return_labels`,
        also each sample's component [num]."""
        k = torch.randint(len(self.variances), [num], generator=generator)
        eps = torch.randn([num, self.means.shape[1]], generator=generator, dtype=torch.float64)
        out = self.from_wavelet(self.means[k] + self.variances[k].sqrt() * eps).reshape(num, *self.shape)
        return (out, k) if return_labels else out


class Digits(AnalyticModel):
    img_channels = 1
    img_resolution = 8

    def __init__(self, device='cpu'):
        super().__init__(device)
        self.data = load_digits_data().reshape(-1, 64).to(self.device)      # [N, 64] in [-1, 1]
        self.data_t = self.data.T.contiguous()
        self.data_sq = self.data.square().sum(-1)

    def _denoise64(self, x, sigma):
        # Softmax over -||x - y||^2 / (2 s^2) = (x.y - ||y||^2 / 2) / s^2 + const(x). One matrix-vector
        # product per sample: the same kernel for every row, so a row's result cannot depend on the
        # batch around it (a batched GEMM may block differently per batch size), and ~30x faster
        # than a broadcast over [B, N, D].
        out = []
        for row in x.split(1):
            logits = (row @ self.data_t - 0.5 * self.data_sq[None]) / sigma ** 2
            out.append(torch.softmax(logits, dim=1) @ self.data)
        return torch.cat(out)


def load_digits_data():
    """The 1797 8x8 digits bundled with scikit-learn (values 0..16) scaled to [-1, 1], [N,1,8,8]."""
    from sklearn.datasets import load_digits
    images = load_digits().images.astype(np.float64)
    return torch.from_numpy(images / 8.0 - 1.0).reshape(-1, 1, 8, 8)


# ----------------------------------------------------------------------------------------------
# High-accuracy reference solver: Dormand-Prince 5(4) with adaptive steps in u = log(sigma),
# where the ODE reads dx/du = x - D(x; e^u) and is smooth over the whole range.

_DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
_DP_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_DP_B5 = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0]
_DP_B4 = [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]


def solve_pf_ode(denoise, x, sigma_from, sigma_to, rtol=1e-9, atol=1e-9, max_steps=100000):
    """Integrate the probability-flow ODE from sigma_from to sigma_to (both > 0) in float64."""
    sigma_from, sigma_to = float(sigma_from), float(sigma_to)
    if sigma_from <= 0 or sigma_to <= 0:
        raise ValueError('exact() needs positive noise levels')
    dtype = x.dtype
    y = x.to(torch.float64)
    u, u_end = math.log(sigma_from), math.log(sigma_to)
    if u == u_end:
        return x.clone()

    def f(uu, yy):
        return yy - denoise(yy, math.exp(uu)).to(torch.float64)

    direction = 1.0 if u_end > u else -1.0
    h = direction * min(0.05, abs(u_end - u))
    k1 = f(u, y)
    for _ in range(max_steps):
        if direction * (u + h - u_end) > 0:
            h = u_end - u
        ks = [k1]
        for i in range(1, 7):
            yi = y + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0)
            ks.append(f(u + _DP_C[i] * h, yi))
        y5 = y + h * sum(b * k for b, k in zip(_DP_B5, ks) if b != 0)
        err = h * sum((b5 - b4) * k for b5, b4, k in zip(_DP_B5, _DP_B4, ks) if b5 != b4)
        scale = atol + rtol * torch.maximum(y.abs(), y5.abs())
        err_norm = float((err / scale).square().mean(dim=tuple(range(1, y.ndim))).sqrt().max())
        if err_norm <= 1.0:
            u, y, k1 = u + h, y5, ks[6]           # FSAL: the last stage is the next first one
            if direction * (u - u_end) >= 0:
                return y.to(dtype)
        factor = 0.9 * (err_norm + 1e-16) ** -0.2
        h = h * min(5.0, max(0.2, factor))
    raise RuntimeError('exact(): step limit reached')


def _check_no_options(name, kw):
    from . import reject_options
    reject_options(name, kw)


def load_gmm(model_path=None, device='cpu', **kw):
    if model_path is not None:
        raise UserError('--model_path: the gmm model is built in and takes no file')
    _check_no_options('gmm', kw)
    return GaussianMixture(device=device)


def load_gmm_wavelet(model_path=None, device='cpu', **kw):
    if model_path is not None:
        raise UserError('--model_path: the gmm_wavelet model is built in and takes no file')
    _check_no_options('gmm_wavelet', kw)
    return WaveletMixture(device=device)


def load_digits(model_path=None, device='cpu', **kw):
    if model_path is not None:
        raise UserError('--model_path: the digits model is built in and takes no file')
    _check_no_options('digits', kw)
    return Digits(device=device)
