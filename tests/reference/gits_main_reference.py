"""An independent reference of the official GITS samplers (zju-pi/diff-sampler, folder gits-main),
for tests of compat='gits-main'. Written from the formulas read there and rearranged by hand
(the iPNDM-v weights simplified, DPM-Solver++ and UniPC from their papers' notation with the
official step-order rules), as plain float64 loops over the steps; the DEIS tAB coefficients
follow the official float32 Riemann-sum rule step by step (torch float32, autograd). It shares
no code with solvers.py, solver_utils.py or gits_main.py.

`sample(name, denoise, x, ts, afs, **options)` returns the trajectory (a list: x at every t_steps
point, then D(x_last) with denoise_to_zero) or raises OfficialCrash where the official code fails.
"""

import math

import numpy as np
import torch


class OfficialCrash(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Shared pieces.

def threshold(D):
    """s = max(0.995-quantile of |D| per sample (linear interpolation between order statistics), 1);
    clamp D to [-s, s] and divide by s."""
    flat = D.abs().reshape(D.shape[0], -1)
    ordered = flat.sort(dim=1).values
    pos = 0.995 * (flat.shape[1] - 1)
    k = int(math.floor(pos))
    q = ordered[:, k] + (pos - k) * (ordered[:, min(k + 1, flat.shape[1] - 1)] - ordered[:, k])
    s = torch.where(q > 1, q, torch.ones_like(q)).reshape(-1, *[1] * (D.dim() - 1))
    return torch.maximum(torch.minimum(D, s), -s) / s


def _afs_slope(x, t):
    return x / math.sqrt(1 + t * t)


def _slope(denoise, x, t):
    return (x - denoise(x, t)) / t


def _finish(denoise, traj, ts, denoise_to_zero):
    if denoise_to_zero:
        traj.append(denoise(traj[-1], ts[-1]))
    return traj


# ----------------------------------------------------------------------------------------------
# One-step methods.

def _euler(denoise, x, ts, afs):
    traj = [x]
    for i in range(len(ts) - 1):
        d = _afs_slope(x, ts[i]) if afs and i == 0 else _slope(denoise, x, ts[i])
        x = x + (ts[i + 1] - ts[i]) * d
        traj.append(x)
    return traj


def _heun(denoise, x, ts, afs):
    traj = [x]
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        d = _afs_slope(x, ts[i]) if afs and i == 0 else _slope(denoise, x, ts[i])
        x_euler = x + h * d
        x = x + h * (d + _slope(denoise, x_euler, ts[i + 1])) / 2
        traj.append(x)
    return traj


def _dpm(denoise, x, ts, afs):
    traj = [x]
    for i in range(len(ts) - 1):
        d = _afs_slope(x, ts[i]) if afs and i == 0 else _slope(denoise, x, ts[i])
        t_mid = math.sqrt(ts[i] * ts[i + 1])
        d_mid = _slope(denoise, x + (t_mid - ts[i]) * d, t_mid)
        x = x + (ts[i + 1] - ts[i]) * d_mid
        traj.append(x)
    return traj


# ----------------------------------------------------------------------------------------------
# Linear multistep methods on the slope d: x_{i+1} = x_i + sum_k c_k d_{i-k}.

AB = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _ipndm_coefficients(ts, i, p):
    return [(ts[i + 1] - ts[i]) * c for c in AB[p]]


def _ipndm_v_coefficients(ts, i, p):
    """The official weights, simplified by hand: with h the step, h1, h2, h3 the previous ones and
    rho = h / h1, u = h1 / h2, v = h1 (h1 + h2) / (h2 (h2 + h3)),
    T1 = 1/2 - h^2 / (6 h1 (h1 + h2)),
    T2 = [(2 h + 3 h1) / (6 (h + h1)) + h (h + 2 h1) / (12 (h + h1) (h + h1 + h2))]
         * h (h + h1) (h + h1 + h2) / (h1 (h1 + h2) (h1 + h2 + h3)),
    weights / h: [1 + rho/2 + T1 + T2, -rho/2 - (1 + u) T1 - (1 + u + v) T2,
                  u T1 + (u + v + v h2 / h3) T2, -u v T2] (truncated to the order)."""
    h = ts[i + 1] - ts[i]
    if p == 1:
        return [h]
    h1 = ts[i] - ts[i - 1]
    rho = h / h1
    if p == 2:
        return [h * (1 + rho / 2), -h * rho / 2]
    h2 = ts[i - 1] - ts[i - 2]
    u = h1 / h2
    T1 = 0.5 - h * h / (6 * h1 * (h1 + h2))
    if p == 3:
        return [h * (1 + rho / 2 + T1), h * (-rho / 2 - (1 + u) * T1), h * u * T1]
    h3 = ts[i - 2] - ts[i - 3]
    v = h1 * (h1 + h2) / (h2 * (h2 + h3))
    T2 = ((2 * h + 3 * h1) / (6 * (h + h1)) + h * (h + 2 * h1) / (12 * (h + h1) * (h + h1 + h2))) \
        * h * (h + h1) * (h + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return [h * (1 + rho / 2 + T1 + T2), h * (-rho / 2 - (1 + u) * T1 - (1 + u + v) * T2),
            h * (u * T1 + (u + v + v * h2 / h3) * T2), -h * u * v * T2]


def _deis_vp_f32():
    """The official VP map coefficients for sigma in [0.002, 80], eps = 1e-3, as float32 torch
    scalars (it takes np.log of float32 tensors, which gives float32 tensors back)."""
    f = lambda v: torch.tensor(v, dtype=torch.float32)
    log = lambda t: torch.tensor(np.log(t.numpy()), dtype=torch.float32)
    lo, hi = log(f(0.002) ** 2 + 1), log(f(80.0) ** 2 + 1)
    beta_d = 2 * (lo / 1e-3 - hi) / (1e-3 - 1)
    return beta_d, hi - 0.5 * beta_d


def _vp_times(ts):
    """The VP times of the schedule as the official holds it: a float32 tensor, mapped in float32."""
    bd, bm = _deis_vp_f32()
    sigma = torch.tensor(list(ts), dtype=torch.float32)
    return ((bm ** 2 + 2 * bd * (sigma ** 2 + 1).log()).sqrt() - bm) / bd


def _deis_tab_coefficients(ts, i, p, points=10_000):
    """Order 1: Euler. Else the integrals over VP time of dsigma/dtau times the Lagrange basis
    through the VP times of t_i, t_{i-1}, ...: float32 throughout (the schedule itself is float32
    there), the integrand at `points` equally spaced VP times including both ends, summed, times
    (tau_{i+1} - tau_i) / points. dsigma/dtau in the official's form:
    -(1/2) (dlog abar/dtau) / sqrt(abar (1 - abar)), abar = exp(-(beta_d/2) tau^2 - beta_min tau),
    with (beta_0, beta_1) = (beta_min, beta_d + beta_min) so that beta_d enters as beta_1 - beta_0,
    and dlog abar/dtau by backpropagation through log(abar), as the official takes it."""
    if p == 1:
        return [ts[i + 1] - ts[i]]
    tau = _vp_times(ts)
    bd, bm = _deis_vp_f32()
    b0, b1 = bm, bd + bm
    taus = torch.linspace(tau[i], tau[i + 1], points)
    with torch.enable_grad():
        taus.requires_grad_(True)
        abar = torch.exp(-0.5 * taus ** 2 * (b1 - b0) - taus * b0)
        abar.log().sum().backward()
    taus, abar, dlog = taus.detach(), abar.detach(), taus.grad
    f = -0.5 * dlog / torch.sqrt(abar * (1 - abar))
    nodes = [tau[i - k] for k in range(p)]
    out = []
    for j in range(p):
        basis = 1
        for k in range(p):
            if k != j:
                basis = basis * ((taus - nodes[k]) / (nodes[j] - nodes[k]))
        out.append(float(torch.sum(f * basis) * ((tau[i + 1] - tau[i]) / points)))
    return out


def _sigma_lagrange_integrals(ts, i, nodes_idx):
    """Exact integrals over [t_i, t_{i+1}] of the Lagrange basis in sigma (numpy polynomials)."""
    nodes = [ts[k] for k in nodes_idx]
    out = []
    for j, yj in enumerate(nodes):
        others = [y for k, y in enumerate(nodes) if k != j]
        poly = np.polynomial.Polynomial.fromroots(others) / np.prod([yj - y for y in others]) if others \
            else np.polynomial.Polynomial([1.0])
        antider = poly.integ()
        out.append(antider(ts[i + 1]) - antider(ts[i]))
    return out


def _deis_rhoab_coefficients(ts, i, p, max_order):
    """The official rhoAB list: step i >= 1 gets the exact integrals of the Lagrange basis in sigma
    of degree min(i, max_order), i.e. min(i, max_order) + 1 weights, while the update unpacks
    min(i + 1, max_order) of them (a mismatch raises); degree 4 has no formula, so such a step
    keeps the previous step's weights."""
    if i == 0:
        return [ts[1] - ts[0]]
    degree = min(i, max_order)
    if degree == 4:
        weights = _deis_rhoab_coefficients(ts, i - 1, min(i, max_order), max_order)
    else:
        weights = _sigma_lagrange_integrals(ts, i, [i - k for k in range(degree + 1)])
    if len(weights) != p:
        raise OfficialCrash(f'rhoab: step {i} has {len(weights)} weights, the update unpacks {p}')
    return weights


def _multistep_on_slope(coefficients):
    def run(denoise, x, ts, afs, max_order=4, **mode):
        if max_order == 1:
            raise OfficialCrash('history buffer update with max_order=1')
        traj, ds = [x], []
        for i in range(len(ts) - 1):
            ds.insert(0, _afs_slope(x, ts[i]) if afs and i == 0 else _slope(denoise, x, ts[i]))
            p = min(max_order, i + 1)
            c = coefficients(ts, i, p, max_order=max_order, **mode)
            x = x + sum(ck * dk for ck, dk in zip(c, ds))
            traj.append(x)
        return traj
    return run


def _deis_coefficients(ts, i, p, max_order, deis_mode='tab'):
    if deis_mode == 'tab':
        return _deis_tab_coefficients(ts, i, p)
    return _deis_rhoab_coefficients(ts, i, p, max_order)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ and UniPC (lambda = -log sigma; alpha = 1 in EDM variables).

def _official_order(i, n_steps, max_order, lower_order_final):
    if i + 1 < max_order:
        return i + 1
    return min(max_order, n_steps - i) if lower_order_final else max_order


def _model_output(denoise, x, t, predict_x0):
    D = denoise(x, t)
    return threshold(D) if predict_x0 else (x - D) / t


def _first_output(denoise, x, t, predict_x0, afs):
    if not afs:
        return _model_output(denoise, x, t, predict_x0)
    d = _afs_slope(x, t)
    return threshold(x - t * d) if predict_x0 else d


def _dpmpp(denoise, x, ts, afs, max_order=3, predict_x0=True, lower_order_final=True, num_steps=None):
    """DPM-Solver++ multistep (arXiv 2211.01095) with h = lambda' - lambda, r_k = h_k / h,
    D1_k = (M_k - M_{k+1}) / r_k, D1 = D1_0 + r0 (D1_0 - D1_1) / (r0 + r1), D2 = (D1_0 - D1_1) / (r0 + r1):
    data prediction (phi1 = e^-h - 1, phi2 = phi1/h + 1, phi3 = phi2/h - 1/2)
        order 1: x' = (t'/t) x - phi1 M0;  2: ... - phi1 D1_0 / 2;  3: ... + phi2 D1 - phi3 D2,
    noise prediction (phi1 = e^h - 1, phi2 = phi1/h - 1, phi3 = phi2/h - 1/2)
        order 1: x' = x - t' phi1 M0;  2: ... - t' phi1 D1_0 / 2;  3: ... - t' (phi2 D1 + phi3 D2).
    `num_steps`: the length the official's order rule is told (its GITS free-step search passes one
    point fewer than the schedule has); an order below 1 fails there."""
    n = len(ts) - 1
    traj, times, Ms = [x], [], []        # newest first
    for i in range(n):
        M = _first_output(denoise, x, ts[i], predict_x0, afs) if i == 0 else _model_output(denoise, x, ts[i], predict_x0)
        times.insert(0, ts[i])
        Ms.insert(0, M)
        p = _official_order(i, n if num_steps is None else num_steps - 1, max_order, lower_order_final)
        if p < 1:
            raise OfficialCrash(f'dpmpp: order {p} at step {i}')
        t, t_next = ts[i], ts[i + 1]
        h = math.log(t) - math.log(t_next)
        r = [(math.log(times[k + 1]) - math.log(times[k])) / h for k in range(p - 1)]
        D1_0 = (Ms[0] - Ms[1]) / r[0] if p >= 2 else None
        if predict_x0:
            phi1 = math.expm1(-h)
            phi2 = phi1 / h + 1
            x_next = (t_next / t) * x - phi1 * Ms[0]
        else:
            phi1 = math.expm1(h)
            phi2 = phi1 / h - 1
            x_next = x - t_next * phi1 * Ms[0]
        if p == 2:
            x_next = x_next - 0.5 * phi1 * D1_0 * (1.0 if predict_x0 else t_next)
        elif p == 3:
            phi3 = phi2 / h - 0.5
            D1_1 = (Ms[1] - Ms[2]) / r[1]
            D1 = D1_0 + r[0] / (r[0] + r[1]) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r[0] + r[1])
            x_next = x_next + (phi2 * D1 - phi3 * D2 if predict_x0 else -t_next * (phi2 * D1 + phi3 * D2))
        x = x_next
        traj.append(x)
    return traj


def _phi(k, z):
    """phi_k(z) = (e^z - sum_{j<k} z^j / j!) / z^k, by phi_{k+1} = (phi_k - 1/k!) / z."""
    out = math.expm1(z) / z
    for j in range(1, k):
        out = (out - 1 / math.factorial(j)) / z
    return out


def _unipc(denoise, x, ts, afs, max_order=3, predict_x0=True, lower_order_final=True, variant='bh2'):
    """UniPC (arXiv 2302.04867): predictor x_pred = base - c B(hh) sum_k rho_k D1_k and corrector
    x = base - c B(hh) (sum_k rho_c,k D1_k + rho_c,last (M_new - M0)), D1_k = (M_k - M0) / r_k,
    r_k = (lambda_k - lambda_0) / h; rho solves R rho = b with R[q][k] = r_k^q and
    b[q] = hh phi_{q+2}(hh) (q+1)! / B(hh), except rho = 1/2 for predictor order 2 and corrector
    order 1. hh = -h (data) or h (noise), c = 1 or t'. Official rules: warm-up steps
    (i + 1 < max_order) take order i + 1 and are always corrected; later steps take
    min(max_order, steps left) with lower_order_final, and every step but the last is corrected."""
    n = len(ts) - 1
    hist = [(ts[0], _first_output(denoise, x, ts[0], predict_x0, afs))]     # newest first
    traj = [x]
    for i in range(n):
        warm = i + 1 < max_order
        p = i + 1 if warm else (min(max_order, n - i) if lower_order_final else max_order)
        corrected = warm or i < n - 1
        t, t_next = ts[i], ts[i + 1]
        h = math.log(t) - math.log(t_next)
        hh = -h if predict_x0 else h
        c = 1.0 if predict_x0 else t_next
        B = hh if variant == 'bh1' else math.expm1(hh)
        lam0 = -math.log(t)
        M0 = hist[0][1]
        rs = [(-math.log(hist[k][0]) - lam0) / h for k in range(1, p)]
        D1s = [(hist[k][1] - M0) / rs[k - 1] for k in range(1, p)]
        base = (t_next / t) * x - math.expm1(hh) * M0 if predict_x0 else x - t_next * math.expm1(hh) * M0
        b = [hh * _phi(q + 2, hh) * math.factorial(q + 1) / B for q in range(p)]
        if p == 1:
            x_pred = base
        else:
            rho = [0.5] if p == 2 else list(np.linalg.solve(np.array([[rk ** q for rk in rs] for q in range(p - 1)]),
                                                            np.array(b[:p - 1])))
            x_pred = base - c * B * sum(rk * Dk for rk, Dk in zip(rho, D1s))
        if not corrected:
            x = x_pred
        else:
            M_new = _model_output(denoise, x_pred, t_next, predict_x0)
            rc = [0.5] if p == 1 else list(np.linalg.solve(np.array([[rk ** q for rk in rs + [1.0]] for q in range(p)]),
                                                           np.array(b)))
            x = base - c * B * (sum(rk * Dk for rk, Dk in zip(rc[:-1], D1s)) + rc[-1] * (M_new - M0))
            hist.insert(0, (t_next, M_new))
        traj.append(x)
    return traj


SAMPLERS = {
    'euler': _euler, 'heun': _heun, 'dpm': _dpm,
    'ipndm': _multistep_on_slope(lambda ts, i, p, max_order: _ipndm_coefficients(ts, i, p)),
    'ipndm_v': _multistep_on_slope(lambda ts, i, p, max_order: _ipndm_v_coefficients(ts, i, p)),
    'deis': _multistep_on_slope(_deis_coefficients),
    'dpmpp': _dpmpp, 'unipc': _unipc,
}


def sample(name, denoise, x, ts, afs=False, denoise_to_zero=False, **options):
    ts = [float(t) for t in ts]
    return _finish(denoise, SAMPLERS[name](denoise, x, ts, afs, **options), ts, denoise_to_zero)


# ----------------------------------------------------------------------------------------------
# The official GITS search (gits_utils.get_dp_list), from its formulas: one set of solver flags
# for the student and the teacher; the teacher (with the student's afs) records its points and the
# slope it stepped with at each; C[i][j] prices one Euler step i -> j; the DP keeps the value
# table V[i][k] and backtracks by the first j whose value reproduces V exactly; with afs every
# point strictly between the first two chosen ones is tried as an extra step, the student run
# with afs and told the student's num_steps.

FLAGS = {'euler': (), 'heun': (), 'dpm': (), 'ipndm': ('max_order',), 'ipndm_v': ('max_order',),
         'deis': ('max_order', 'deis_mode'), 'dpmpp': ('max_order', 'predict_x0', 'lower_order_final'),
         'unipc': ('max_order', 'predict_x0', 'lower_order_final', 'variant')}   # what each sampler reads


def _flags(name, flags):
    return {k: flags[k] for k in FLAGS[name] if k in flags}


def chord_distance(points, start, end):
    """Per sample, the distance of each point [B, D] from the line through start and end,
    measured from the end point: |(e - p) - ((e - p) . u) u| with u = (e - s) / |e - s|."""
    u = (end - start) / (end - start).norm(dim=1, keepdim=True)
    ep = end - points
    return (ep - (ep * u).sum(1, keepdim=True) * u).norm(dim=1)


def cost_matrix(traj, slopes, ts, metric):
    """[N, N] (zero on and below the diagonal): batch means of the metric of the Euler step from
    teacher point i with its slope, against teacher point j; 'dev' = its chord distance minus the
    teacher point's (whose last one counts as 0)."""
    n = len(ts)
    flat = [x.reshape(x.shape[0], -1) for x in traj]
    start, end = flat[0], flat[-1]
    dev_tea = [chord_distance(flat[j], start, end).mean() for j in range(1, n - 1)] + [0.0]
    cost = np.zeros((n, n))
    for i in range(n - 1):
        d = slopes[i].reshape(flat[i].shape)
        for j in range(i + 1, n):
            step = flat[i] + (ts[j] - ts[i]) * d
            if metric == 'l1':
                cost[i][j] = float((step - flat[j]).abs().sum(1).mean())
            elif metric == 'l2':
                cost[i][j] = float((step - flat[j]).norm(dim=1).mean())
            else:
                cost[i][j] = float(chord_distance(step, start, end).mean() - dev_tea[j - 1])
    return cost


def dp(cost, num_steps, coeff):
    """The official DP: V[i][1] = C[i][-1], V[j][k] = min_{j<i<n-1} C[j][i] + coeff V[i][k-1];
    from 0, each next point is the first j with V[w][k] == C[w][j] + coeff V[j][k-1]."""
    n, K = len(cost), num_steps - 1
    V = np.full((n, K + 1), np.inf)
    V[:, 1] = cost[:, -1]
    for k in range(2, K + 1):
        for j in range(n - 1):
            for i in range(j + 1, n - 1):
                V[j][k] = min(V[j][k], cost[j][i] + coeff * V[i][k - 1])
    path, w = [0], 0
    for k in range(K, 0, -1):
        for j in range(w + 1, n):
            if V[w][k] == cost[w][j] + coeff * V[j][k - 1]:
                path.append(j)
                w = j
                break
    return path + [n - 1]


def _trial(denoise, x, ts, solver, flags, num_steps, solver_tea, t_tea):
    """One free-step candidate as the official samples it (OfficialCrash where that fails)."""
    if solver == 'unipc':
        raise OfficialCrash('no UniPC in the free-step search')
    if solver == 'deis':            # the coefficient list is the teacher's (None unless it is DEIS)
        if solver_tea != 'deis':
            raise OfficialCrash('deis without a coefficient list')
        rows = lambda ts_, i, p, max_order, **mode: ([ts_[i + 1] - ts_[i]] if p == 1 else
                                                     _deis_coefficients(t_tea, i, p, max_order, **mode))
        return _multistep_on_slope(rows)(denoise, x, ts, True, **_flags('deis', flags))[-1]
    extra = dict(num_steps=num_steps) if solver == 'dpmpp' else {}
    return sample(solver, denoise, x, ts, afs=True, **_flags(solver, flags), **extra)[-1]


def search(denoise, latents, t_tea, num_steps, solver, solver_tea, flags, afs=False, metric='dev', coeff=1.15):
    """The official search's t_tea indices (OfficialCrash where it fails)."""
    ts = [float(t) for t in t_tea]
    traj = sample(solver_tea, denoise, latents * ts[0], ts, afs=afs, **_flags(solver_tea, flags))
    slopes = [_afs_slope(traj[0], ts[0]) if afs and i == 0 else _slope(denoise, traj[i], ts[i])
              for i in range(len(ts) - 1)]
    path = dp(cost_matrix(traj, slopes, ts, metric), num_steps, coeff)
    if not afs:
        return path
    best, chosen = math.inf, path
    for k in range(1, path[1]):
        trial = path[:1] + [k] + path[1:]
        out = _trial(denoise, latents * ts[0], [ts[m] for m in trial], solver, flags, num_steps, solver_tea, ts)
        dist = float((out - traj[-1]).reshape(out.shape[0], -1).norm(dim=1).mean())
        if dist < best:
            best, chosen = dist, trial
    return chosen
