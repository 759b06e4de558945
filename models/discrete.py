"""Discrete-time VP models (ADM, LDM, Stable Diffusion) seen as continuous denoisers in sigma.

Such a model is trained at integer timesteps t = 0..T-1 with cumulative products `alphas_cumprod`;
its noise level is sigma_t = sqrt((1 - abar_t) / abar_t). A VP sample x_vp = sqrt(abar) x0 +
sqrt(1 - abar) eps equals x / sqrt(1 + sigma^2) for the EDM-style x = x0 + sigma eps, so
D(x; sigma) = x - sigma * eps_theta(x / sqrt(1 + sigma^2), t(sigma)), where t(sigma) is a
fractional timestep found by interpolating log-sigma between the integer timesteps.
"""

import numpy as np
import torch

from .base import Model


def linear_alphas_cumprod(beta_start=1e-4, beta_end=0.02, num_timesteps=1000):
    """guided-diffusion's 'linear' schedule."""
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def scaled_linear_alphas_cumprod(beta_start, beta_end, num_timesteps=1000):
    """latent-diffusion's 'linear' schedule (linear in sqrt(beta)), used by LDM and SD."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


class DiscreteVPModel(Model):
    """Base class: subclasses implement `eps(x_vp, t, **cond)` with `t` a float tensor [B] of
    fractional timesteps."""

    def __init__(self, alphas_cumprod, device='cpu'):
        self.device = torch.device(device)
        ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        self.alphas_cumprod = ac
        self.log_sigmas = 0.5 * torch.log((1 - ac) / ac)        # increasing in t
        self.num_timesteps = len(ac)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())

    def sigma(self, t):
        """Noise level at fractional timestep t in [0, T-1] (log-sigma interpolated), on t's device."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        log_sigmas = self.log_sigma_table(t.device)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()

    def log_sigma_table(self, device):
        """`log_sigmas` on `device`, copied there once: a copy inside the sampling loop would make
        the host wait for every kernel queued before it."""
        tables = self.__dict__.setdefault('_log_sigma_tables', {})
        if device not in tables:
            tables[device] = self.log_sigmas.to(device)
        return tables[device]

    def sigma_inv(self, sigma):
        """Fractional timestep whose noise level is sigma (inverse of `sigma`), clamped to [0, T-1]."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1)).reshape(log_sigma.shape)
        hi = idx.clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        w = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return (lo + w).clamp(0, self.num_timesteps - 1)

    def eps(self, x_vp, t, **cond):
        raise NotImplementedError

    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        sigma_f = float(sigma)
        # The timestep is found on the host and filled in on the device (a copy would wait, see above).
        t_host = float(self.sigma_inv(sigma_f).to(torch.float32))
        t = torch.full([x.shape[0]], t_host, dtype=torch.float32, device=x.device)
        cond = {k: v for k, v in dict(class_labels=class_labels, condition=condition,
                                      unconditional_condition=unconditional_condition).items() if v is not None}
        eps = self.eps(x / (1 + sigma_f ** 2) ** 0.5, t, **cond)
        return (x - sigma_f * eps.to(x.dtype))
