"""The machinery shared by the solvers: coefficient tables of the multistep methods, the model
output history, dynamic thresholding, the analytical first step, and the recording denoiser.

Schedules and `--t_steps` live in schedules.py; `get_schedule`, `parse_t_steps` (stable interfaces)
and the other names below are re-exported here for callers that import them from this module. The
official GITS code's tables and rules are in gits_main.py: the table builders here take a step-order
rule (and DPM-Solver++'s order-3 update, UniPC's last-step corrector rule) so that it can reuse them."""

import collections
import functools
import math

import numpy as np
import torch

from schedules import (SCHEDULES, check_compat, check_t_steps, compat_mode, format_t_steps,   # noqa: F401
                       get_schedule, parse_t_steps, vp_coefficients, vp_map_is_monotone, vp_sigma, vp_sigma_inv,
                       vp_time)


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


def step_order(i, num_intervals, max_order, lower_order_final):
    """Order of step i: grows with the history (1, 2, ...) up to max_order; with lower_order_final
    it also shrinks on the last steps (at most the number of steps left)."""
    p = min(max_order, i + 1)
    return min(p, num_intervals - i) if lower_order_final else p


def step_orders(num_intervals, max_order, lower_order_final=False, rule=step_order):
    """The order of every step under `rule` (ours, `step_order`, or a reproduced code's)."""
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
    v1 = log_ratio(t_to, t_from)
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
    v_next = log_ratio(t_next, t_cur)

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
    h = -log_ratio(t_next, t_cur)
    if form == 'x0':
        return t_next / t_cur, (t_cur - t_next) / t_cur, 1.0, -h     # -expm1(-h), without round-off
    return 1.0, t_next - t_cur, t_next, h


def _lambda_ratio(ts, i, k):
    """r_k = (lambda_{i-k} - lambda_i) / h_i (negative for past points)."""
    return log_ratio(ts[i - k], ts[i]) / log_ratio(ts[i + 1], ts[i])


def log_ratio(a, b):
    """log(a / b) to full relative precision also when a and b are close."""
    return math.log1p((a - b) / b)


def dpmpp3_exact(ts, i, form):
    return tuple(lagrange_weights(ts, i, 3, 'log_sigma', form))


@functools.lru_cache(maxsize=256)
def dpmpp_table(ts, max_order, form='x0', lower_order_final=True, order_rule=step_order, order3=dpmpp3_exact):
    """DPM-Solver++ multistep in EDM variables. Order 1 is DDIM; order 2 is the published
    DPM-Solver++(2M) update x = a x + w0 [(1 + 1/(2r)) m_i - 1/(2r) m_{i-1}], r = h_{i-1}/h_i.

    Order 3 is NOT the published DPM-Solver++(3M) update: it integrates the quadratic interpolant
    of m_i, m_{i-1}, m_{i-2} in lambda = -log sigma exactly against the exponential weight
    (quadrature, accurate on any grid). The published 3M update (DPM-Solver++, diffusers, and the
    official gits-main code, whose `order3` is gits_main.dpmpp3_published) writes the same expansion
    with D1 ~ h m' and D2 ~ h^2 m''/2 but weights D2 by phi_3 = phi_2/h - 1/2 (about h/6 in size),
    half of the exact integral's 2 phi_3: its local error keeps an O(h^3) term, so it is a second-order
    method (measured order ~2 on gmm, tests/test_compat.py), while ours has order 3. Order 2 is
    second order on any grid; order 1 (DDIM) first order. `order_rule`: see step_orders."""
    orders = step_orders(len(ts) - 1, max_order, lower_order_final, order_rule)
    rows = []
    for i, p in enumerate(orders):
        a, w0, _, _ = _exp_base(ts, i, form)
        if p == 1:
            rows.append((a, (w0,)))
        elif p == 2:
            r = -_lambda_ratio(ts, i, 1)
            rows.append((a, (w0 * (1 + 0.5 / r), -w0 * 0.5 / r)))
        else:
            rows.append((a, order3(ts, i, form)))
    return tuple(rows)


def _b_h(hh, variant):
    return hh if variant == 'bh1' else math.expm1(hh)


def never_corrects_last_step(num_intervals, max_order):
    """Ours: UniPC does not correct the last step (its corrector would cost one more evaluation
    and serve no next step)."""
    return False


@functools.lru_cache(maxsize=256)
def unipc_table(ts, max_order, form='x0', variant='bh2', lower_order_final=True, order_rule=step_order,
                corrects_last_step=never_corrects_last_step):
    """UniPC (UniP-p predictor, UniC-p corrector) in EDM variables, as two tables: predictor rows
    over [m_i, m_{i-1}, ...] and corrector rows over [m_{i+1}, m_i, m_{i-1}, ...] (None where a
    step is not corrected: after the last step, unless `corrects_last_step`). UniPC's coefficients
    rho solve sum_k rho_k r_k^(n-1) = n! h phi_{n+1}(hh) / B(hh),
    n = 1..p: exactly the conditions that make the update integrate the interpolant through its
    nodes exactly, so where the paper solves that system (predictor p = 3, corrector p >= 2) the
    weights are the exact Lagrange integrals in lambda (B(h) cancels there). Where it fixes
    rho = 1/2 (predictor p = 2, corrector p = 1) B(h) matters: bh1 B = hh, bh2 B = expm1(hh)."""
    n = len(ts) - 1
    orders = step_orders(n, max_order, lower_order_final, order_rule)
    last_corrected = corrects_last_step(n, max_order)
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
