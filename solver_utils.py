"""Time schedules, `--t_steps` parsing, and machinery shared by the solvers.

`compat='gits-main'` selects the official GITS code's variant of a schedule or a coefficient
table (zju-pi/diff-sampler, folder gits-main), so that sampling reproduces its outputs; each
variant is a separate function next to ours, chosen through a small registry, and its docstring
says how it differs and which one is right."""

import collections
import functools
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
    out = vp_sigma(t, beta_d, beta_min)
    out[0], out[-1] = sigma_max, sigma_min     # remove round-off at the ends
    return out


def _discrete_model(model):
    if model is None or not hasattr(model, 'sigma') or not hasattr(model, 'sigma_inv'):
        raise ValueError('--schedule_type=discrete needs a discrete-time model '
                         '(imagenet256, lsun_bedroom_ldm, ffhq_ldm, ms_coco)')
    return model


def discrete_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None):
    """Uniform (with exponent rho) in the model's own discrete time, mapped through sigma(t)."""
    model = _discrete_model(model)
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


# The official gits-main schedules (compat='gits-main'). They compute in float32 (torch's default
# dtype; ours are float64: up to ~5e-6 relative apart), and differ in two places:
# - time_uniform: beta_d and beta_min come from float32 log(1 + sigma^2), which rounds 1 + 0.002^2
#   to 1 + 34 float32 ulps, and float32 exp(u) - 1 keeps that rounding: the schedule ends at
#   0.0020132, not 0.002, and its small noise levels carry up to ~1e-3 relative rounding.
# - discrete: rho acts on the model's continuous time t in [1/T, 1] (timestep index + 1 = T t),
#   ours on the timestep index; and only t_min is raised to 1/rho (t_max is 1 for the model's
#   own sigma_max, which the official CLI always uses).

def _f32(value):
    return torch.tensor(value, dtype=torch.float32)


def _log_f32(value):
    """float32 natural log as numpy computes it (the official takes np.log of float32 tensors)."""
    return torch.tensor(np.log(np.asarray(value.numpy(), dtype=np.float32)), dtype=torch.float32)


def _fraction_f32(num_steps):
    return torch.arange(num_steps) / (num_steps - 1)        # int64 / int -> float32


def gits_vp_coefficients(sigma_min, sigma_max, eps=1e-3):
    """vp_coefficients as the official computes them: float32 (0-dim tensors)."""
    lo, hi = _log_f32(_f32(sigma_min) ** 2 + 1), _log_f32(_f32(sigma_max) ** 2 + 1)
    beta_d = 2 * (lo / eps - hi) / (eps - 1)
    return beta_d, hi - 0.5 * beta_d


def gits_polynomial_schedule(num_steps, sigma_min, sigma_max, rho=7.0, model=None):
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + _fraction_f32(num_steps) * (b - a)) ** rho


def gits_logsnr_schedule(num_steps, sigma_min, sigma_max, rho=None, model=None):
    lam_min, lam_max = -torch.log(_f32(sigma_max)), -torch.log(_f32(sigma_min))
    return (-torch.linspace(lam_min.item(), lam_max.item(), num_steps, dtype=torch.float32)).exp()


def gits_time_uniform_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None, eps=1e-3):
    time_uniform_schedule(2, sigma_min, sigma_max, eps=eps)      # the same refusal as ours
    beta_d, beta_min = gits_vp_coefficients(sigma_min, sigma_max, eps)
    t = (1 + _fraction_f32(num_steps) * (eps ** (1 / rho) - 1)) ** rho
    return (math.e ** (0.5 * beta_d * t ** 2 + beta_min * t) - 1) ** 0.5


def gits_discrete_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None):
    model = _discrete_model(model)
    if not hasattr(model, 'num_timesteps'):
        raise ValueError('--compat: the gits-main discrete schedule needs a model with a number of timesteps')
    T = model.num_timesteps
    t_max, t_min = ((float(model.sigma_inv(s)) + 1) / T for s in (sigma_max, sigma_min))
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = (t_max + k * (t_min ** (1 / rho) - t_max)) ** rho
    return torch.as_tensor(model.sigma(t * T - 1), dtype=torch.float64)


SCHEDULE_VARIANTS = {
    None: SCHEDULE_FNS,
    'gits-main': {'polynomial': gits_polynomial_schedule, 'logsnr': gits_logsnr_schedule,
                  'time_uniform': gits_time_uniform_schedule, 'discrete': gits_discrete_schedule},
}
COMPAT_MODES = tuple(k for k in SCHEDULE_VARIANTS if k is not None)


def check_compat(compat):
    """None or one of COMPAT_MODES; else ValueError naming --compat."""
    if compat is not None and compat not in COMPAT_MODES:
        raise ValueError(f'--compat: must be one of {", ".join(COMPAT_MODES)} (got "{compat}")')
    return compat


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0, model=None,
                 compat=None):
    """The `num_steps` noise levels of a named schedule (float64, strictly decreasing); with
    compat='gits-main' the official code's values (see SCHEDULE_VARIANTS)."""
    fns = SCHEDULE_VARIANTS[check_compat(compat)]
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
    if compat is None:
        # The ends are sigma_max and sigma_min exactly; the formulas land an ulp or two off (e.g.
        # 79.99999999999997), which only makes the printed schedule harder to read. (The official
        # code's float32 schedules keep their own ends.)
        t[0], t[-1] = float(sigma_max), float(sigma_min)
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


# ----------------------------------------------------------------------------------------------
# Multistep machinery. A multistep solver is a table of per-step linear combinations,
#
#     x_{i+1} = a_i x_i + sum_k w_ik m_{i-k},
#
# where m_j is the model output at t_j in the solver's own form: the slope d = (x - D) / t
# ('eps', the noise prediction in EDM variables) or the denoised D ('x0'). Every table is
# computed once per schedule (and cached), in float64, from the schedule alone.
#
# The weights of the variable-step methods are integrals of Lagrange basis polynomials over one
# step, taken in u = log(sigma) by composite Gauss-Legendre quadrature. All interpolation nodes
# lie outside the open step interval, so each basis polynomial keeps one sign inside it, and so
# does the weight function: every quadrature sum adds terms of one sign and is accurate to a few
# ulps relative, whatever the grid (a first step from 80 to 0.8, a 61-point teacher grid, ...).
# Closed forms built from expm1/phi functions or Vandermonde solves lose digits on such grids.

AB_WEIGHTS = {   # Adams-Bashforth weights for equal steps, newest first (iPNDM)
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(12)
_PIECE = 0.5   # widest quadrature piece in log(sigma); every integrand is analytic in a strip
               # of half-width >= pi/2 around the real u axis, so 12 nodes reach round-off


class History:
    """The last `size` model outputs, newest first."""

    def __init__(self, size):
        self.items = collections.deque(maxlen=max(int(size), 1))

    def push(self, m):
        self.items.appendleft(m)

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def combine(a, x, weights, outputs):
    """a * x + sum_k weights[k] * outputs[k] (extra outputs beyond len(weights) are ignored)."""
    out = x * a if a != 1 else x.clone()
    for w, m in zip(weights, outputs):
        out.add_(m, alpha=w)
    return out


def _order_ours(i, num_intervals, max_order, lower_order_final):
    p = min(max_order, i + 1)
    return min(p, num_intervals - i) if lower_order_final else p


def _order_gits_main(i, num_intervals, max_order, lower_order_final):
    """The official rule: a warm-up step (i + 1 < max_order) takes order i + 1 even where
    lower_order_final would lower it. It differs from ours only on 3 time points with max_order 3
    (order 2 on the last step, where ours uses 1)."""
    if i + 1 < max_order:
        return i + 1
    return min(max_order, num_intervals - i) if lower_order_final else max_order


ORDER_RULES = {None: _order_ours, 'gits-main': _order_gits_main}


def step_orders(num_intervals, max_order, lower_order_final=False, compat=None):
    """Order of each step: grows with the history (1, 2, ...) up to max_order; with
    lower_order_final it also shrinks on the last steps (at most the number of steps left)."""
    rule = ORDER_RULES[compat]
    return [rule(i, num_intervals, max_order, lower_order_final) for i in range(num_intervals)]


THRESHOLD_QUANTILE = 0.995
_QUANTILE_MAX_ELEMENTS = 1 << 24        # torch.quantile refuses larger inputs


def dynamic_threshold(D):
    """Dynamic thresholding of a data prediction (Saharia et al. 2022, Imagen), as the official
    dpmpp and unipc apply it: per sample s = max(quantile_0.995(|D|), 1), D -> clamp(D, -s, s) / s.
    It assumes data in [-1, 1] (pixels), and it changes the ODE being solved: the result no longer
    converges to the exact flow wherever the prediction leaves [-1, 1]."""
    flat = D.abs().reshape(D.shape[0], -1)
    rows = max(1, _QUANTILE_MAX_ELEMENTS // flat.shape[1])
    s = torch.cat([torch.quantile(chunk, THRESHOLD_QUANTILE, dim=1) for chunk in flat.split(rows)])
    s = s.clamp(min=1).reshape(-1, *[1] * (D.dim() - 1))
    return D.clamp(-s, s) / s


def quad_log_sigma(fn, t_from, t_to):
    """Integral of fn(sigma, v) over v = log(sigma / t_from) from 0 to log(t_to / t_from)
    (oriented), by composite Gauss-Legendre. Measuring from t_from keeps v, and so differences
    of log-sigma nodes, at full relative precision even for tiny steps. `fn` maps float64 arrays
    of sigma and v to an array [..., len(v)]."""
    v1 = _log_ratio(t_to, t_from)
    pieces = max(1, math.ceil(abs(v1) / _PIECE))
    edges = np.linspace(0.0, v1, pieces + 1)
    half = 0.5 * (edges[1:] - edges[:-1])                                    # [P]
    v = (0.5 * (edges[1:] + edges[:-1]))[:, None] + half[:, None] * _GL_NODES  # [P, n]
    w = half[:, None] * _GL_WEIGHTS
    v, w = v.reshape(-1), w.reshape(-1)
    return (fn(t_from * np.exp(v), v) * w).sum(-1)


def lagrange_basis(nodes, y):
    """Lagrange basis polynomials through `nodes` evaluated at y: [len(nodes), len(y)], in
    product form (each factor to full relative precision)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    out = np.ones([len(nodes), len(y)])
    for k, yk in enumerate(nodes):
        for m, ym in enumerate(nodes):
            if m != k:
                out[k] *= (y - ym) / (yk - ym)
    return out


def vp_time(sigma, beta_d, beta_min):
    """VP time of noise level sigma (inverse of vp_sigma) for numpy arrays, without the
    cancellation of sqrt(b^2 + 2 d L) - b when beta_min > 0."""
    log1p_s2 = np.log1p(np.square(sigma))
    root = np.sqrt(beta_min ** 2 + 2 * beta_d * log1p_s2)
    if beta_min > 0:
        return 2 * log1p_s2 / (root + beta_min)
    return (root - beta_min) / beta_d


def lagrange_weights(ts, i, order, space='sigma', form='eps', vp=None, extra_node=False):
    """Weights of the step t_i -> t_{i+1} that integrate exactly the degree order-1 Lagrange
    interpolant of the model output through t_i, t_{i-1}, ... (newest first; with `extra_node`
    the point t_{i+1} itself comes first, as in a corrector step), in the variable `space`:
    'sigma', 'vp_time' (VP time of the map `vp`) or 'log_sigma' (taken relative to log t_i).
    form 'eps': x_{i+1} = x_i + int m dsigma; form 'x0' (data prediction, the exponential
    integrator): x_{i+1} = (t_{i+1}/t_i) x_i + t_{i+1} int e^lambda D dlambda, lambda = -log sigma."""
    t_cur, t_next = ts[i], ts[i + 1]
    if extra_node:
        pts = [t_next] + [ts[i - k] for k in range(order - 1)]
    else:
        pts = [ts[i - k] for k in range(order)]
    pts = np.asarray(pts, dtype=np.float64)
    if space == 'sigma':
        nodes, y_of = pts, (lambda s, v: s)
    elif space == 'log_sigma':
        nodes, y_of = np.log1p((pts - t_cur) / t_cur), (lambda s, v: v)
    elif space == 'vp_time':
        nodes, y_of = vp_time(pts, *vp), (lambda s, v: vp_time(s, *vp))
    else:
        raise ValueError(f'unknown interpolation space "{space}"')
    v_next = _log_ratio(t_next, t_cur)

    def integrand(s, v):
        g = s if form == 'eps' else -np.exp(v_next - v)   # dsigma/dv, or t_next e^lambda dlambda/dv
        return lagrange_basis(nodes, y_of(s, v)) * g

    return [float(w) for w in quad_log_sigma(integrand, t_cur, t_next)]


@functools.lru_cache(maxsize=256)
def ipndm_table(ts, max_order):
    """iPNDM: fixed Adams-Bashforth weights times the step h (exact order only on grids uniform
    in sigma)."""
    orders = step_orders(len(ts) - 1, max_order)
    return tuple((1.0, tuple((ts[i + 1] - ts[i]) * w for w in AB_WEIGHTS[p])) for i, p in enumerate(orders))


def deis_vp_map(t_first, t_last):
    """(beta_d, beta_min) of the VP time in which DEIS tAB interpolates: the time_uniform map of
    the schedule's own range (so a time_uniform grid has equally spaced nodes). Where that range
    has no valid map (t_last too large, e.g. --t_steps ending at 1), the map of the range
    (0.002, t_first) is used instead: any monotone time change keeps the method consistent."""
    vp = vp_coefficients(t_last, t_first)
    if not vp_map_is_monotone(*vp):
        vp = vp_coefficients(min(t_last, 0.002), t_first)
        if not vp_map_is_monotone(*vp):
            raise ValueError(f'--deis_mode: tab has no valid VP time map for a schedule starting at {t_first}; '
                             'use --deis_mode=rhoab')
    return vp


@functools.lru_cache(maxsize=256)
def adams_table(ts, max_order, space='sigma', form='eps', lower_order_final=False):
    """Variable-step Adams-Bashforth in `space` (see lagrange_weights), order growing with the
    history. space='sigma', form='eps': iPNDM-v and DEIS rhoAB; 'vp_time': DEIS tAB; 'log_sigma':
    DPM-Solver++ / UniPC predictors in closed (exact-integral) form."""
    vp = deis_vp_map(ts[0], ts[-1]) if space == 'vp_time' else None
    orders = step_orders(len(ts) - 1, max_order, lower_order_final)
    rows = []
    for i, p in enumerate(orders):
        a = ts[i + 1] / ts[i] if form == 'x0' else 1.0
        rows.append((a, tuple(lagrange_weights(ts, i, p, space, form, vp))))
    return tuple(rows)


def _exp_base(ts, i, form):
    """x_{i+1} = a x_i + w0 m_i: the order-1 exponential integrator (DDIM), and c, hh such that
    the UniPC/DPM-Solver++ correction terms read -c * B(hh) * ...: hh = -h for data prediction
    and +h for noise prediction, h = log(t_i / t_{i+1}) the step in lambda = -log sigma."""
    t_cur, t_next = ts[i], ts[i + 1]
    h = -_log_ratio(t_next, t_cur)
    if form == 'x0':
        return t_next / t_cur, (t_cur - t_next) / t_cur, 1.0, -h     # -expm1(-h), without round-off
    return 1.0, t_next - t_cur, t_next, h


def _lambda_ratio(ts, i, k):
    """r_k = (lambda_{i-k} - lambda_i) / h_i (negative for past points)."""
    return _log_ratio(ts[i - k], ts[i]) / _log_ratio(ts[i + 1], ts[i])


def _log_ratio(a, b):
    """log(a / b) to full relative precision also when a and b are close."""
    return math.log1p((a - b) / b)


def _dpmpp3_exact(ts, i, form):
    return tuple(lagrange_weights(ts, i, 3, 'log_sigma', form))


def _dpmpp3_published(ts, i, form):
    """The published DPM-Solver++(3M) update (DPM-Solver++ / diffusers; the official gits-main):
    x = a x + c0 m_i + c1 D1 + c2 D2 with D1_0 = (m_i - m_{i-1}) / r0, D1_1 = (m_{i-1} - m_{i-2}) / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), r_k = h_{i-1-k} / h,
    and phi_1 = expm1(-/+h), phi_2 = phi_1 / h +/- 1, phi_3 = phi_2 / h - 1/2 (data / noise
    prediction); (c0, c1, c2) = (-phi_1, phi_2, -phi_3), or -t_{i+1} (phi_1, phi_2, phi_3)."""
    h = -_log_ratio(ts[i + 1], ts[i])
    r0, r1 = (_log_ratio(ts[i - k], ts[i - k + 1]) / h for k in (1, 2))
    if form == 'x0':
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1
        c = (-phi1, phi2, -(phi2 / h - 0.5))
    else:
        phi1 = math.expm1(h)
        phi2 = phi1 / h - 1
        c = tuple(-ts[i + 1] * v for v in (phi1, phi2, phi2 / h - 0.5))
    d1_0, d1_1 = (1 / r0, -1 / r0, 0.0), (0.0, 1 / r1, -1 / r1)          # over m_i, m_{i-1}, m_{i-2}
    q = r0 / (r0 + r1)
    d1 = [(1 + q) * u - q * v for u, v in zip(d1_0, d1_1)]
    d2 = [(u - v) / (r0 + r1) for u, v in zip(d1_0, d1_1)]
    w = [c[1] * u + c[2] * v for u, v in zip(d1, d2)]
    w[0] += c[0]
    return tuple(w)


DPMPP_ORDER3 = {None: _dpmpp3_exact, 'gits-main': _dpmpp3_published}


@functools.lru_cache(maxsize=256)
def dpmpp_table(ts, max_order, form='x0', lower_order_final=True, compat=None):
    """DPM-Solver++ multistep in EDM variables. Order 1 is DDIM; order 2 is the published
    DPM-Solver++(2M) update x = a x + w0 [(1 + 1/(2r)) m_i - 1/(2r) m_{i-1}], r = h_{i-1}/h_i.

    Order 3 is NOT the published DPM-Solver++(3M) update: it integrates the quadratic interpolant
    of m_i, m_{i-1}, m_{i-2} in lambda = -log sigma exactly against the exponential weight
    (quadrature, accurate on any grid). The published 3M update (DPM-Solver++, diffusers, and the
    official gits-main code; compat='gits-main', `_dpmpp3_published`) writes the same expansion
    with D1 ~ h m' and D2 ~ h^2 m''/2 but weights D2 by phi_3 = phi_2/h - 1/2 (about h/6 in size),
    half of the exact integral's 2 phi_3: its local error keeps an O(h^3) term, so it is a second-order
    method (measured order ~2 on gmm, tests/test_compat.py), while ours has order 3. Order 2 is
    second order on any grid; order 1 (DDIM) first order."""
    orders = step_orders(len(ts) - 1, max_order, lower_order_final, compat)
    rows = []
    for i, p in enumerate(orders):
        a, w0, _, _ = _exp_base(ts, i, form)
        if p == 1:
            rows.append((a, (w0,)))
        elif p == 2:
            r = -_lambda_ratio(ts, i, 1)
            rows.append((a, (w0 * (1 + 0.5 / r), -w0 * 0.5 / r)))
        else:
            rows.append((a, DPMPP_ORDER3[compat](ts, i, form)))
    return tuple(rows)


def _b_h(hh, variant):
    return hh if variant == 'bh1' else math.expm1(hh)


# Whether UniPC corrects the last step, which costs one more evaluation. Ours: never. The official
# corrects every warm-up step (i + 1 < max_order), so also the last one when the schedule has fewer
# steps than max_order (2 time points with max_order >= 2, 3 with max_order 3).
LAST_STEP_CORRECTED = {None: lambda num_intervals, max_order: False,
                       'gits-main': lambda num_intervals, max_order: num_intervals < max_order}


def unipc_corrects_last_step(num_intervals, max_order, compat=None):
    return LAST_STEP_CORRECTED[compat](num_intervals, max_order)


@functools.lru_cache(maxsize=256)
def unipc_table(ts, max_order, form='x0', variant='bh2', lower_order_final=True, compat=None):
    """UniPC (UniP-p predictor, UniC-p corrector) in EDM variables, as two tables: predictor rows
    over [m_i, m_{i-1}, ...] and corrector rows over [m_{i+1}, m_i, m_{i-1}, ...] (None where a
    step is not corrected: after the last step, see LAST_STEP_CORRECTED). UniPC's coefficients
    rho solve sum_k rho_k r_k^(n-1) = n! h phi_{n+1}(hh) / B(hh),
    n = 1..p: exactly the conditions that make the update integrate the interpolant through its
    nodes exactly, so where the paper solves that system (predictor p = 3, corrector p >= 2) the
    weights are the exact Lagrange integrals in lambda (B(h) cancels there). Where it fixes
    rho = 1/2 (predictor p = 2, corrector p = 1) B(h) matters: bh1 B = hh, bh2 B = expm1(hh)."""
    n = len(ts) - 1
    orders = step_orders(n, max_order, lower_order_final, compat)
    last_corrected = unipc_corrects_last_step(n, max_order, compat)
    pred, corr = [], []
    for i, p in enumerate(orders):
        a, w0, c, hh = _exp_base(ts, i, form)
        bh = _b_h(hh, variant)
        if p == 1:
            pred.append((a, (w0,)))
        elif p == 2:
            k = 0.5 * c * bh / _lambda_ratio(ts, i, 1)          # -c B rho D1, D1 = (m_{i-1} - m_i) / r
            pred.append((a, (w0 + k, -k)))
        else:
            pred.append((a, tuple(lagrange_weights(ts, i, p, 'log_sigma', form))))
        if i == n - 1 and not last_corrected:
            corr.append(None)
        elif p == 1:
            k = 0.5 * c * bh                                      # -c B rho (m_{i+1} - m_i), rho = 1/2
            corr.append((a, (-k, w0 + k)))
        else:
            corr.append((a, tuple(lagrange_weights(ts, i, p + 1, 'log_sigma', form, extra_node=True))))
    return tuple(pred), tuple(corr)


# ----------------------------------------------------------------------------------------------
# The official gits-main tables of iPNDM-v and DEIS (compat='gits-main').

def _gits_ipndm_v_weights(h, h1=None, h2=None, h3=None):
    """The official variable-step weights (times h) over d_i, d_{i-1}, ... for order 1 + the
    number of previous steps given; h = t_{i+1} - t_i, h1 = t_i - t_{i-1}, h2, h3 earlier steps.
    Order 2 is variable-step Adams-Bashforth. Order 3 reads temp = (1 - h / (3 (h + h1)) * R) / 2,
    R = h (h + h1) / (h1 (h1 + h2)), where Adams-Bashforth has (1 - h / (3 (h + h1))) * R / 2 (a
    missing parenthesis). The two differ by O(h/h1 - 1), so on smooth grids order 3 is kept
    (measured 3.2 on gmm); on rough grids (GITS schedules) the weights differ by up to ~50%.
    Order 4 has two more slips: its fourth-difference term is not Adams-Bashforth's even on equal
    steps (weights (57, -65, 43, -11) / 24, not (55, -59, 37, -9) / 24), and its last weight
    carries h1/h2 where h2/h3 belongs, so a row sums to 1 + temp2 v (h2/h3 - h1/h2): exactly
    consistent only on grids with a constant step ratio (uniform, logsnr); on other smooth grids
    the consistency error leaves a second-order method (measured 1.7-1.9 on gmm)."""
    if h1 is None:
        return (1.0,)
    rho = h / h1
    if h2 is None:
        return (1 + rho / 2, -rho / 2)
    temp1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    u = h1 / h2
    if h3 is None:
        return (1 + rho / 2 + temp1, -rho / 2 - (1 + u) * temp1, u * temp1)
    v = h1 * (h1 + h2) / (h2 * (h2 + h3))
    temp2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
             * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    return (1 + rho / 2 + temp1 + temp2,
            -rho / 2 - (1 + u) * temp1 - (1 + u + v) * temp2,
            u * temp1 + (u + v * (1 + h2 / h3)) * temp2,
            -temp2 * v * u)


@functools.lru_cache(maxsize=256)
def gits_ipndm_v_table(ts, max_order):
    """iPNDM-v as the official gits-main code computes it (`_gits_ipndm_v_weights`)."""
    rows = []
    for i, p in enumerate(step_orders(len(ts) - 1, max_order)):
        h = ts[i + 1] - ts[i]
        previous = [ts[i - k] - ts[i - k - 1] for k in range(p - 1)]
        rows.append((1.0, tuple(h * w for w in _gits_ipndm_v_weights(h, *previous))))
    return tuple(rows)


GITS_DEIS_POINTS = 10_000
GITS_DEIS_RANGE = (0.002, 80.0)


def gits_deis_tab_weights(i, order, beta_d, beta_min, vp_times):
    """The official tAB weights of step i: the integrals of the Lagrange basis in VP time times
    dsigma/dtau, by a float32 Riemann sum: the integrand at N = 10,000 equally spaced points
    including both ends of the step, summed and multiplied by (tau_{i+1} - tau_i) / N (a rule
    with an O(1/N) error: 1e-5 to 3e-5 of a row's largest weight on 6- to 61-point schedules,
    more for its smaller weights). The VP map is always that of GITS_DEIS_RANGE with
    float32 coefficients, whatever the schedule's range. dsigma/dtau = -(1/2) dlog(abar)/dtau /
    sqrt(abar (1 - abar)), abar = exp(-beta_d tau^2 / 2 - beta_min tau), in float32: 1 - abar
    loses up to ~1% near sigma = 0.002, which these numbers reproduce."""
    beta_0, beta_1 = beta_min, beta_d + beta_min        # the official's (beta_0, beta_1) pair
    tau_cur, tau_next = vp_times[i], vp_times[i + 1]
    taus = torch.linspace(tau_cur, tau_next, GITS_DEIS_POINTS, dtype=torch.float32)
    abar = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
    dlog_abar = -taus * (beta_1 - beta_0) - beta_0
    integrand = -0.5 * dlog_abar / torch.sqrt(abar * (1 - abar))
    dtau = (tau_next - tau_cur) / GITS_DEIS_POINTS
    nodes = [vp_times[i - k] for k in range(order)]
    weights = []
    for j in range(order):
        basis = torch.ones_like(taus)
        for k in range(order):
            if k != j:
                basis = basis * ((taus - nodes[k]) / (nodes[j] - nodes[k]))
        weights.append(float(torch.sum(integrand * basis) * dtau))
    return tuple(weights)


@functools.lru_cache(maxsize=256)
def gits_deis_tab_table(ts, max_order):
    """DEIS tAB as the official gits-main code computes it: Euler on the first step, then
    `gits_deis_tab_weights` (float32 VP coefficients of GITS_DEIS_RANGE; VP times of the
    schedule in float64 from them)."""
    beta_d, beta_min = gits_vp_coefficients(*GITS_DEIS_RANGE)
    sigma = torch.tensor(ts, dtype=torch.float64)
    vp_times = ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    rows = []
    for i, p in enumerate(step_orders(len(ts) - 1, max_order)):
        weights = (ts[i + 1] - ts[i],) if p == 1 else gits_deis_tab_weights(i, p, beta_d, beta_min, vp_times)
        rows.append((1.0, weights))
    return tuple(rows)


def gits_deis_rhoab_failure(num_points, max_order):
    """Why the official DEIS rhoAB fails on this many time points, or None. Its coefficient list
    gives step i >= 1 the weights of a polynomial of degree min(i, max_order) (one more weight than
    the update's order min(i + 1, max_order) unpacks once i >= max_order), and has no branch for
    degree 4: with max_order 2 the update raises from step 2 on (4+ time points), with max_order 3
    from step 3 on (5+ points); with max_order 4 steps 4, 5, ... silently reuse step 3's weights."""
    if max_order in (2, 3) and num_points >= max_order + 2:
        return (f'--deis_mode: the official gits-main DEIS rhoab crashes with max_order={max_order} on '
                f'{max_order + 2} or more time points (got {num_points}); use --deis_mode=tab or --max_order=4')
    return None


@functools.lru_cache(maxsize=256)
def gits_deis_rhoab_table(ts, max_order):
    """DEIS rhoAB as the official gits-main code runs it: our exact Lagrange-in-sigma weights
    (its closed forms are the same integrals) up to step 3; with max_order 4 every later step
    reuses step 3's weights (see gits_deis_rhoab_failure)."""
    failure = gits_deis_rhoab_failure(len(ts), max_order)
    if failure:
        raise ValueError(failure)
    rows = adams_table(ts, max_order, 'sigma', 'eps')
    return rows[:4] + rows[3:4] * max(0, len(rows) - 4)


# ----------------------------------------------------------------------------------------------
# Pieces every solver shares.

class Recorder:
    """A denoiser that counts its calls and evaluations (batch rows) and, with keep=True,
    remembers every call by noise level: callers that inspect a run (the GITS teacher,
    trajectory.py) look up the solver's own evaluations at its grid points instead of paying for
    new ones, and budgets (the refinement's) count what was spent."""

    def __init__(self, denoise, keep=False):
        self.denoise, self.keep = denoise, keep
        self.calls, self.evals, self.kept = 0, 0, {}

    def __call__(self, x, sigma):
        out = self.denoise(x, sigma)
        self.calls += 1
        self.evals += x.shape[0]
        if self.keep:
            self.kept.setdefault(float(sigma), []).append((x, out))
        return out

    def lookup(self, x, sigma):
        """The output of an earlier call at exactly (x, sigma), or None."""
        for seen, out in self.kept.get(float(sigma), []):
            if seen.shape == x.shape and torch.equal(seen, x):
                return out
        return None



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
