"""Time schedules, `--t_steps` parsing, and machinery shared by the solvers."""

import math
import re

import torch

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform', 'discrete')


# ----------------------------------------------------------------------------------------------
# Schedules. Each returns a float64 tensor of `num_steps` strictly decreasing noise levels from
# sigma_max to sigma_min.

def polynomial_schedule(num_steps, sigma_min, sigma_max, rho=7.0, model=None):
    """EDM's schedule: uniform in sigma^(1/rho)."""
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + k * (b - a)) ** rho


def logsnr_schedule(num_steps, sigma_min, sigma_max, rho=None, model=None):
    """Uniform in log sigma (= uniform in half the log-SNR)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()


def vp_coefficients(sigma_min, sigma_max, eps=1e-3):
    """beta_d, beta_min of the VP map sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) that takes
    VP time eps to sigma_min and 1 to sigma_max."""
    lo, hi = math.log1p(sigma_min ** 2), math.log1p(sigma_max ** 2)
    beta_d = 2 * (lo - eps * hi) / (eps * eps - eps)
    beta_min = hi - beta_d / 2
    return beta_d, beta_min


def vp_sigma(t, beta_d, beta_min):
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma, beta_d, beta_min):
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return ((beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)).sqrt() - beta_min) / beta_d


def time_uniform_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None, eps=1e-3):
    """Uniform (with exponent rho) in VP time between 1 and eps."""
    beta_d, beta_min = vp_coefficients(sigma_min, sigma_max, eps)
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = (1.0 + k * (eps ** (1 / rho) - 1.0)) ** rho
    out = vp_sigma(t, beta_d, beta_min)
    out[0], out[-1] = sigma_max, sigma_min     # remove round-off at the ends
    return out


def discrete_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None):
    """Uniform (with exponent rho) in the model's own discrete time, mapped through sigma(t)."""
    if model is None or not hasattr(model, 'sigma') or not hasattr(model, 'sigma_inv'):
        raise ValueError('--schedule_type=discrete needs a discrete-time model '
                         '(imagenet256, lsun_bedroom_ldm, ffhq_ldm, ms_coco)')
    t_max = float(model.sigma_inv(sigma_max))
    t_min = float(model.sigma_inv(sigma_min))
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = (t_max ** (1 / rho) + k * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    out = torch.as_tensor(model.sigma(t), dtype=torch.float64).clone()
    out[0], out[-1] = sigma_max, sigma_min
    return out


SCHEDULE_FNS = {
    'polynomial': polynomial_schedule,
    'logsnr': logsnr_schedule,
    'time_uniform': time_uniform_schedule,
    'discrete': discrete_schedule,
}


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0, model=None):
    """The `num_steps` noise levels of a named schedule (float64, strictly decreasing)."""
    if schedule_type not in SCHEDULE_FNS:
        raise ValueError(f'--schedule_type: unknown schedule "{schedule_type}"; choose one of {", ".join(SCHEDULES)}')
    if int(num_steps) < 2:
        raise ValueError(f'--num_steps: must be at least 2 (got {num_steps})')
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f'--sigma_min/--sigma_max: need 0 < sigma_min < sigma_max (got {sigma_min}, {sigma_max})')
    if schedule_rho is not None and schedule_rho <= 0:
        raise ValueError(f'--schedule_rho: must be positive (got {schedule_rho})')
    t = SCHEDULE_FNS[schedule_type](int(num_steps), float(sigma_min), float(sigma_max),
                                    rho=float(schedule_rho), model=model)
    return t.to(torch.float64)


# ----------------------------------------------------------------------------------------------
# Explicit schedules.

_NUMBER = r'[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?'


def parse_t_steps(text):
    """Parse '[80,10.9836,...,0.002]' (brackets optional) into a list of floats. ValueError if the
    text is malformed, has fewer than two entries, a non-positive entry, or is not strictly
    decreasing."""
    body = str(text).strip()
    if body.startswith('[') and body.endswith(']'):
        body = body[1:-1]
    parts = [p.strip() for p in body.split(',')]
    if any(re.fullmatch(_NUMBER, p) is None for p in parts):
        raise ValueError(f'--t_steps: expected a list of numbers like [80,10.98,...,0.002], got "{text}"')
    values = [float(p) for p in parts]
    check_t_steps(values)
    return values


def check_t_steps(values):
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError('--t_steps: needs at least two noise levels')
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError('--t_steps: every noise level must be positive and finite')
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError('--t_steps: noise levels must be strictly decreasing')
    return values


def format_t_steps(t_steps):
    """Paste-able form '[80.0,10.98...,0.002]' (no spaces). repr() gives the shortest text that
    parses back to the same float64, so pasting it reproduces the run exactly."""
    return '[' + ','.join(repr(float(v)) for v in t_steps) + ']'


# ----------------------------------------------------------------------------------------------
# Pieces every solver shares.

def afs_slope(x, t):
    """Analytical first step: at the largest noise level D(x; t) is close to the data mean (~0),
    so the slope (x - D) / t is approximated by x / sqrt(1 + t^2) without a network call."""
    return x / (1.0 + float(t) ** 2) ** 0.5


def finish(denoise, x, t_last, inters, denoise_to_zero, return_inters):
    """Common ending: optional final denoising D(x_last; t_last), optional stacked trajectory."""
    if denoise_to_zero:
        x = denoise(x, t_last)
        if return_inters:
            inters.append(x)
    if return_inters:
        return x, torch.stack(inters)
    return x
