"""High-precision (mpmath) reference values of the multistep solver coefficients, derived
independently of solver_utils: direct adaptive quadrature in each method's own variable
(sigma, VP time, lambda = -log sigma) and, for UniPC, the linear system of the UniPC paper
(arXiv 2302.04867) with its phi functions."""

import functools

import mpmath as mp

mp.mp.dps = 40


def lagrange(nodes, k, y):
    out = mp.mpf(1)
    for m, ym in enumerate(nodes):
        if m != k:
            out *= (y - ym) / (nodes[k] - ym)
    return out


def _quad(f, a, b, pieces=6):
    return mp.quad(f, mp.linspace(a, b, pieces + 1))


def orders(n_steps, max_order, lower_order_final):
    out = [min(max_order, i + 1) for i in range(n_steps)]
    return [min(p, n_steps - i) for i, p in enumerate(out)] if lower_order_final else out


def sigma_adams(ts, i, p):
    """x_{i+1} = x_i + sum_k w_k d_{i-k}: integral of the Lagrange basis in sigma."""
    s = [mp.mpf(t) for t in ts]
    nodes = [s[i - k] for k in range(p)]
    return [_quad(lambda y, k=k: lagrange(nodes, k, y), s[i], s[i + 1], 1) for k in range(p)]


def vp_params(smin, smax, eps=mp.mpf('0.001')):
    lo, hi = mp.log(1 + mp.mpf(smin) ** 2), mp.log(1 + mp.mpf(smax) ** 2)
    bd = 2 * (lo - eps * hi) / (eps * eps - eps)
    return bd, hi - bd / 2


def vp_tab(ts, i, p, smin, smax):
    """DEIS tAB: integral over VP time of dsigma/dtau times the Lagrange basis in VP time."""
    bd, bm = vp_params(smin, smax)
    tau = lambda s: (mp.sqrt(bm ** 2 + 2 * bd * mp.log(1 + mp.mpf(s) ** 2)) - bm) / bd

    def dsigma(t):
        e = bd * t * t / 2 + bm * t
        return (bd * t + bm) * mp.exp(e) / (2 * mp.sqrt(mp.expm1(e)))

    nodes = [tau(ts[i - k]) for k in range(p)]
    return [_quad(lambda t, k=k: dsigma(t) * lagrange(nodes, k, t), tau(ts[i]), tau(ts[i + 1]), 12)
            for k in range(p)]


def lambda_adams(ts, i, p, predict_x0):
    """Exact integral of the Lagrange interpolant in lambda against the exponential weight:
    data prediction t_{i+1} e^lambda dlambda, noise prediction dsigma = -e^-lambda dlambda."""
    lam = [-mp.log(mp.mpf(t)) for t in ts]
    nodes = [lam[i - k] for k in range(p)]
    t_next = mp.mpf(ts[i + 1])
    weight = (lambda l: t_next * mp.exp(l)) if predict_x0 else (lambda l: -mp.exp(-l))
    return [_quad(lambda l, k=k: weight(l) * lagrange(nodes, k, l), lam[i], lam[i + 1], 4) for k in range(p)]


def dpmpp2(ts, i, predict_x0):
    """The DPM-Solver++(2M) update (paper, Algorithm 2) and its noise-prediction twin."""
    t0, t1, tm = (mp.mpf(ts[j]) for j in (i, i + 1, i - 1))
    h, h_prev = mp.log(t0 / t1), mp.log(tm / t0)
    r = h_prev / h
    w0 = -mp.expm1(-h) if predict_x0 else t1 - t0
    return [w0 * (1 + 1 / (2 * r)), -w0 / (2 * r)]


def _phi(k, z):
    out = mp.expm1(z) / z
    for j in range(1, k):
        out = (out - 1 / mp.factorial(j)) / z
    return out


def unipc(ts, i, p, predict_x0, variant, corrector):
    """UniPC weights from the paper's formulation: x = a x + W0 m_i - c B(hh) sum_k rho_k D1_k,
    D1_k = (m_{i-k} - m_i) / r_k (and D1 = m_new - m_i with r = 1 for the corrector), rho from
    R rho = b, R[q][k] = r_k^q, b[q] = hh phi_{q+2}(hh) (q+1)! / B(hh); rho = 1/2 where the paper
    fixes it (predictor order 2, corrector order 1). Returns the weights over [m_new,] m_i, m_{i-1}..."""
    lam = [-mp.log(mp.mpf(t)) for t in ts]
    h = lam[i + 1] - lam[i]
    hh = -h if predict_x0 else h
    c = mp.mpf(1) if predict_x0 else mp.mpf(ts[i + 1])
    w0 = -c * mp.expm1(hh)
    B = hh if variant == 'bh1' else mp.expm1(hh)
    rs = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
    if corrector:
        rs = rs + [mp.mpf(1)]
    n = len(rs)
    if n == 0:
        return [w0]
    if (not corrector and p == 2) or (corrector and p == 1):
        rho = [mp.mpf('0.5')]
    else:
        R = mp.matrix([[r ** q for r in rs] for q in range(n)])
        b = mp.matrix([hh * _phi(q + 2, hh) * mp.factorial(q + 1) / B for q in range(n)])
        rho = list(mp.lu_solve(R, b))
    past = [mp.mpf(0)] * p       # weights on m_i, m_{i-1}, ...
    past[0] = w0
    new = mp.mpf(0)
    for k, (r, rk) in enumerate(zip(rs, rho)):
        coef = -c * B * rk / r
        past[0] -= coef
        if corrector and k == n - 1:
            new += coef
        else:
            past[k + 1] += coef
    return ([new] if corrector else []) + past


# ----------------------------------------------------------------------------------------------
# Whole runs: plain float64 loops over the steps with the weights above, written from the papers
# (DPM-Solver++ Algorithm 2 and its higher orders; UniPC's predictor-corrector with the corrector
# reusing the next evaluation, none after the last step). They check the solvers' step loop (which
# order each step takes, which step is corrected), where the coefficient tests check the tables.

def _output(denoise, x, t, predict_x0):
    D = denoise(x, t)
    return D if predict_x0 else (x - D) / t


def _combine(a, x, weights, outputs):
    return a * x + sum(float(w) * m for w, m in zip(weights, outputs))


@functools.lru_cache(maxsize=None)         # the runs of several option sets share weights
def dpmpp_weights(ts, i, p, predict_x0):
    return dpmpp2(ts, i, predict_x0) if p == 2 else lambda_adams(ts, i, p, predict_x0)


def multistep_run(denoise, x, ts, max_order, predict_x0, lower_order_final, predictor, corrector=None):
    """The trajectory [len(ts), ...] of x_{i+1} = a x_i + sum_k w_k m_{i-k} (m: D or the slope, newest
    first), a = t_{i+1} / t_i in data prediction and 1 in noise prediction; `predictor(i, p)` gives
    step i's weights at order p; `corrector(i, p)`, if given, the weights over [m_{i+1}, m_i, ...] that
    correct every step but the last, with the evaluation m_{i+1} at the predicted point."""
    n = len(ts) - 1
    step_orders = orders(n, max_order, lower_order_final)
    history = [_output(denoise, x, ts[0], predict_x0)]
    out = [x]
    for i, p in enumerate(step_orders):
        a = ts[i + 1] / ts[i] if predict_x0 else 1.0
        x_next = _combine(a, x, predictor(i, p), history)
        if i < n - 1:
            m_next = _output(denoise, x_next, ts[i + 1], predict_x0)
            if corrector is not None:
                x_next = _combine(a, x, corrector(i, p), [m_next] + history)
            history.insert(0, m_next)
        x = x_next
        out.append(x)
    return out


def dpmpp_run(denoise, x, ts, max_order, predict_x0, lower_order_final):
    return multistep_run(denoise, x, ts, max_order, predict_x0, lower_order_final,
                         lambda i, p: dpmpp_weights(ts, i, p, predict_x0))


_unipc_weights = functools.lru_cache(maxsize=None)(unipc)


def unipc_run(denoise, x, ts, max_order, predict_x0, lower_order_final, variant):
    weights = _unipc_weights
    return multistep_run(denoise, x, ts, max_order, predict_x0, lower_order_final,
                         lambda i, p: weights(ts, i, p, predict_x0, variant, False),
                         lambda i, p: weights(ts, i, p, predict_x0, variant, True))
