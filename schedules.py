"""Time schedules: the named schedules (`get_schedule`), the VP time map they and DEIS share, and
`--t_steps` parsing, checking and formatting.

`compat` names a code base whose schedules are reproduced instead of ours (gits_main.py: the
official GITS code's float32 schedules); `compat_mode` gives its object."""

import math
import re

import numpy as np
import torch

import schedule_presets

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform', 'discrete')


# ----------------------------------------------------------------------------------------------
# Schedules. Each returns a float64 tensor of `num_steps` strictly decreasing noise levels from
# sigma_max to sigma_min.

def polynomial_schedule(num_steps, sigma_min, sigma_max, rho=7.0, model=None):
    """EDM's schedule: uniform in sigma^(1/rho)."""
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _exact_ends((a + k * (b - a)) ** rho, sigma_min, sigma_max)


def logsnr_schedule(num_steps, sigma_min, sigma_max, rho=None, model=None):
    """Uniform in log sigma (= uniform in half the log-SNR)."""
    t = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()
    return _exact_ends(t, sigma_min, sigma_max)


def _exact_ends(t, sigma_min, sigma_max):
    """The ends are sigma_max and sigma_min exactly; the formulas land an ulp or two off (e.g.
    79.99999999999997), which only makes the printed schedule harder to read."""
    t[0], t[-1] = sigma_max, sigma_min
    return t


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


def vp_time(sigma, beta_d, beta_min):
    """VP time of noise level sigma (inverse of vp_sigma) for numpy arrays, without the
    cancellation of sqrt(b^2 + 2 d L) - b when beta_min > 0."""
    log1p_s2 = np.log1p(np.square(sigma))
    root = np.sqrt(beta_min ** 2 + 2 * beta_d * log1p_s2)
    if beta_min > 0:
        return 2 * log1p_s2 / (root + beta_min)
    return (root - beta_min) / beta_d


def vp_map_is_monotone(beta_d, beta_min, eps=1e-3):
    """Whether the VP exponent beta_d t^2/2 + beta_min t increases on [eps, 1], i.e. the map is
    a valid time change. It is not once sigma_min is too large for sigma_max (with the default
    eps and sigma_max = 80: sigma_min above about 0.09)."""
    return beta_d * eps + beta_min > 0 and beta_d + beta_min > 0


def time_uniform_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None, eps=1e-3):
    """Uniform (with exponent rho) in VP time between 1 and eps."""
    beta_d, beta_min = vp_coefficients(sigma_min, sigma_max, eps)
    if not vp_map_is_monotone(beta_d, beta_min, eps):
        raise ValueError(f'--schedule_type: time_uniform has no valid VP time map for sigma_min={sigma_min} '
                         f'and sigma_max={sigma_max} (lower --sigma_min, e.g. the default)')
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = (1.0 + k * (eps ** (1 / rho) - 1.0)) ** rho
    return _exact_ends(vp_sigma(t, beta_d, beta_min), sigma_min, sigma_max)


def discrete_model(model):
    if model is None or not hasattr(model, 'sigma') or not hasattr(model, 'sigma_inv'):
        raise ValueError('--schedule_type=discrete needs a discrete-time model '
                         '(imagenet256, lsun_bedroom_ldm, ffhq_ldm, ms_coco)')
    return model


def discrete_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None):
    """Uniform (with exponent rho) in the model's own discrete time, mapped through sigma(t)."""
    model = discrete_model(model)
    t_max = float(model.sigma_inv(sigma_max))
    t_min = float(model.sigma_inv(sigma_min))
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = (t_max ** (1 / rho) + k * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    return _exact_ends(torch.as_tensor(model.sigma(t), dtype=torch.float64).clone(), sigma_min, sigma_max)


SCHEDULE_FNS = {
    'polynomial': polynomial_schedule,
    'logsnr': logsnr_schedule,
    'time_uniform': time_uniform_schedule,
    'discrete': discrete_schedule,
}


# Reproduced code bases, by --compat name: objects that hold a code base's schedules, coefficient
# tables, step-order rules and refusals, which the default code asks for. gits_main.py registers
# 'gits-main' when it is imported (solvers.py imports it, so it is there wherever a solver runs).
COMPAT_MODES = {}


def compat_mode(compat):
    """The object of the code base that `compat` reproduces, or None for ours; ValueError naming
    --compat for an unknown name."""
    if compat is None:
        return None
    if compat not in COMPAT_MODES:
        raise ValueError(f'--compat: must be one of {", ".join(COMPAT_MODES)} (got "{compat}")')
    return COMPAT_MODES[compat]


def check_compat(compat):
    """None or the name of a reproduced code base (COMPAT_MODES); else ValueError naming --compat."""
    compat_mode(compat)
    return compat


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0, model=None,
                 compat=None):
    """The `num_steps` noise levels of a named schedule (float64, strictly decreasing); with
    compat='gits-main' the official code's values (gits_main.py)."""
    mode = compat_mode(compat)
    fns = mode.schedules if mode else SCHEDULE_FNS
    if schedule_type not in fns:
        raise ValueError(f'--schedule_type: unknown schedule "{schedule_type}"; choose one of {", ".join(SCHEDULES)}')
    if int(num_steps) < 2:
        raise ValueError(f'--num_steps: must be at least 2 (got {num_steps})')
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f'--sigma_min/--sigma_max: need 0 < sigma_min < sigma_max (got {sigma_min}, {sigma_max})')
    if schedule_rho is not None and schedule_rho <= 0:
        raise ValueError(f'--schedule_rho: must be positive (got {schedule_rho})')
    t = fns[schedule_type](int(num_steps), float(sigma_min), float(sigma_max),
                           rho=float(schedule_rho), model=model).to(torch.float64)
    if not (torch.isfinite(t).all() and (t > 0).all() and (t[1:] < t[:-1]).all()):
        raise ValueError(f'--schedule_type: the {schedule_type} schedule for num_steps={num_steps}, '
                         f'sigma_min={sigma_min}, sigma_max={sigma_max} is not strictly decreasing')
    return t


# ----------------------------------------------------------------------------------------------
# Explicit schedules.

_NUMBER = r'[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?'


def parse_t_steps(text):
    """Parse '[80,10.9836,...,0.002]' (brackets optional) into a list of floats, or a named preset
    such as 'gits_sd15:coeff=1.20:steps=10' or 'ays_sd15' (schedule_presets.py). ValueError if the
    text is malformed, has fewer than two entries, a non-positive entry, or is not strictly
    decreasing, or names no preset."""
    if schedule_presets.is_preset_text(text):
        return check_t_steps(schedule_presets.preset_t_steps(text))
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

