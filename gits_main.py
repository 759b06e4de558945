"""The official GITS code (zju-pi/diff-sampler, folder gits-main), reproduced: `--compat=gits-main`.

Our default code is the method as the paper and the solvers' papers state it; where the official
code computes something else, this module holds its version, so that a run with
compat='gits-main' gives the official output (to round-off) with the same denoiser calls, and a
one-line ValueError where the official code crashes. Every difference is listed, with which side
is right, in docs/official-differences.md.

Importing it registers `GitsMain` as schedules.COMPAT_MODES['gits-main'], the object the default
code asks (schedules.compat_mode; solvers.py imports this module): its float32
schedules, its coefficient tables and step-order rules, its thresholding default, the refusals of
what it cannot run, and the differences of its search. euler, heun and dpm are the same in both.
"""

import functools
import math

import numpy as np
import torch

import schedules
import solver_utils

NAME = 'gits-main'


# ----------------------------------------------------------------------------------------------
# 1. Schedules. They compute in float32 (torch's default dtype; ours are float64: up to ~5e-6
# relative apart), and differ from ours in two places:
# - time_uniform: beta_d and beta_min come from float32 log(1 + sigma^2), which rounds 1 + 0.002^2
#   to 1 + 34 float32 ulps, and float32 exp(u) - 1 keeps that rounding: the schedule ends at
#   0.0020132, not 0.002, and its small noise levels carry up to ~1e-3 relative rounding.
# - discrete: rho acts on the model's continuous time t in [1/T, 1] (timestep index + 1 = T t),
#   ours on the timestep index; and only t_min is raised to 1/rho (t_max is 1 for the model's
#   own sigma_max, which the official CLI always uses).
# They keep their own float32 ends (ours are set to sigma_max and sigma_min exactly).

def _f32(value):
    return torch.tensor(value, dtype=torch.float32)


def _log_f32(value):
    """float32 natural log as numpy computes it (the official takes np.log of float32 tensors)."""
    return torch.tensor(np.log(np.asarray(value.numpy(), dtype=np.float32)), dtype=torch.float32)


def _fraction_f32(num_steps):
    return torch.arange(num_steps) / (num_steps - 1)        # int64 / int -> float32


def vp_coefficients_f32(sigma_min, sigma_max, eps=1e-3):
    """schedules.vp_coefficients as the official computes them: float32 (0-dim tensors)."""
    lo, hi = _log_f32(_f32(sigma_min) ** 2 + 1), _log_f32(_f32(sigma_max) ** 2 + 1)
    beta_d = 2 * (lo / eps - hi) / (eps - 1)
    return beta_d, hi - 0.5 * beta_d


def polynomial_schedule(num_steps, sigma_min, sigma_max, rho=7.0, model=None):
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + _fraction_f32(num_steps) * (b - a)) ** rho


def logsnr_schedule(num_steps, sigma_min, sigma_max, rho=None, model=None):
    lam_min, lam_max = -torch.log(_f32(sigma_max)), -torch.log(_f32(sigma_min))
    return (-torch.linspace(lam_min.item(), lam_max.item(), num_steps, dtype=torch.float32)).exp()


def time_uniform_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None, eps=1e-3):
    schedules.time_uniform_schedule(2, sigma_min, sigma_max, eps=eps)      # the same refusal as ours
    beta_d, beta_min = vp_coefficients_f32(sigma_min, sigma_max, eps)
    t = (1 + _fraction_f32(num_steps) * (eps ** (1 / rho) - 1)) ** rho
    return (math.e ** (0.5 * beta_d * t ** 2 + beta_min * t) - 1) ** 0.5


def discrete_schedule(num_steps, sigma_min, sigma_max, rho=1.0, model=None):
    model = schedules.discrete_model(model)
    if not hasattr(model, 'num_timesteps'):
        raise ValueError('--compat: the gits-main discrete schedule needs a model with a number of timesteps')
    T = model.num_timesteps
    t_max, t_min = ((float(model.sigma_inv(s)) + 1) / T for s in (sigma_max, sigma_min))
    k = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = (t_max + k * (t_min ** (1 / rho) - t_max)) ** rho
    return torch.as_tensor(model.sigma(t * T - 1), dtype=torch.float64)


SCHEDULES = {'polynomial': polynomial_schedule, 'logsnr': logsnr_schedule,
             'time_uniform': time_uniform_schedule, 'discrete': discrete_schedule}


# ----------------------------------------------------------------------------------------------
# 2. Step orders, DPM-Solver++ and UniPC: our table builders (solver_utils) with the official rules.

def step_order(i, num_intervals, max_order, lower_order_final):
    """The official rule: a warm-up step (i + 1 < max_order) takes order i + 1 even where
    lower_order_final would lower it. It differs from ours only on 3 time points with max_order 3
    (order 2 on the last step, where ours uses 1)."""
    if i + 1 < max_order:
        return i + 1
    return min(max_order, num_intervals - i) if lower_order_final else max_order


def step_orders(num_intervals, max_order, lower_order_final=False):
    return solver_utils.step_orders(num_intervals, max_order, lower_order_final, step_order)


def dpmpp3_published(ts, i, form):
    """The published DPM-Solver++(3M) update (DPM-Solver++ / diffusers; the official gits-main):
    x = a x + c0 m_i + c1 D1 + c2 D2 with D1_0 = (m_i - m_{i-1}) / r0, D1_1 = (m_{i-1} - m_{i-2}) / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), r_k = h_{i-1-k} / h,
    and phi_1 = expm1(-/+h), phi_2 = phi_1 / h +/- 1, phi_3 = phi_2 / h - 1/2 (data / noise
    prediction); (c0, c1, c2) = (-phi_1, phi_2, -phi_3), or -t_{i+1} (phi_1, phi_2, phi_3). It
    weights D2 by half the exact integral's 2 phi_3, so it is a second-order method (see
    solver_utils.dpmpp_table)."""
    log_ratio = solver_utils.log_ratio
    h = -log_ratio(ts[i + 1], ts[i])
    r0, r1 = (log_ratio(ts[i - k], ts[i - k + 1]) / h for k in (1, 2))
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


def unipc_corrects_last_step(num_intervals, max_order):
    """The official corrects every warm-up step (i + 1 < max_order), so also the last one when
    the schedule has fewer steps than max_order (2 time points with max_order >= 2, 3 with
    max_order 3): one more evaluation."""
    return num_intervals < max_order


def dpmpp_table(ts, max_order, form='x0', lower_order_final=True):
    return solver_utils.dpmpp_table(ts, max_order, form, lower_order_final, step_order, dpmpp3_published)


def unipc_table(ts, max_order, form='x0', variant='bh2', lower_order_final=True):
    return solver_utils.unipc_table(ts, max_order, form, variant, lower_order_final, step_order,
                                    unipc_corrects_last_step)


# ----------------------------------------------------------------------------------------------
# 3. iPNDM-v and DEIS: the official coefficient formulas.

def _ipndm_v_weights(h, h1=None, h2=None, h3=None):
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
def ipndm_v_table(ts, max_order):
    """iPNDM-v as the official code computes it (`_ipndm_v_weights`)."""
    rows = []
    for i, p in enumerate(solver_utils.step_orders(len(ts) - 1, max_order)):
        h = ts[i + 1] - ts[i]
        previous = [ts[i - k] - ts[i - k - 1] for k in range(p - 1)]
        rows.append((1.0, tuple(h * w for w in _ipndm_v_weights(h, *previous))))
    return tuple(rows)


# DEIS tAB. The official integrates the Lagrange basis in VP time times dsigma/dtau by a Riemann
# sum, all in float32 (the official keeps its schedules in float32): the VP times of the float32
# schedule in the VP map of DEIS_RANGE (whatever the schedule's range), the integrand at
# DEIS_POINTS equally spaced VP times including both ends of the step, summed and multiplied by
# (tau_{i+1} - tau_i) / DEIS_POINTS: a rule with an O(1/N) error (1e-5 to 3e-5 of a row's largest
# weight on 6- to 61-point schedules, more for its smaller weights). dsigma/dtau is
# -(1/2) (dlog abar/dtau) / sqrt(abar (1 - abar)), abar = exp(-beta_d tau^2 / 2 - beta_min tau),
# with dlog abar/dtau taken by autograd through log(abar). Two of these float32 steps move the
# result well beyond round-off, so they are followed exactly: the last VP time (sigma = 0.002,
# where float32 log(1 + sigma^2) keeps 2 digits) moves the last step's weights by ~1e-4 of the
# float64 computation's, and 1 - abar loses up to ~1% near sigma_min; autograd's rounding
# (1/abar times abar) moves the weights by ~5e-8.

DEIS_POINTS = 10_000
DEIS_RANGE = (0.002, 80.0)


def deis_vp_times(ts):
    """The float32 VP times of the schedule `ts` (rounded to float32, as the official holds it),
    and the float32 (beta_0, beta_1) = (beta_min, beta_d + beta_min) of the official's VP map."""
    beta_d, beta_min = vp_coefficients_f32(*DEIS_RANGE)
    sigma = torch.tensor(ts, dtype=torch.float32)
    taus = ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return taus, beta_min, beta_d + beta_min


def _deis_integrand(taus, beta_0, beta_1):
    """dsigma/dtau at the float32 VP times `taus`, as the official computes it (autograd)."""
    with torch.inference_mode(False), torch.enable_grad():
        taus = taus.detach().clone().requires_grad_(True)
        abar = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        dlog_abar, = torch.autograd.grad(abar.log().sum(), taus)
    abar = abar.detach()
    return -0.5 * dlog_abar / torch.sqrt(abar * (1 - abar))


def deis_tab_weights(taus, i, order, beta_0, beta_1):
    """The official tAB weights of step i (order >= 2), as Python floats."""
    grid = torch.linspace(taus[i], taus[i + 1], DEIS_POINTS)
    dtau = (taus[i + 1] - taus[i]) / DEIS_POINTS
    integrand = _deis_integrand(grid, beta_0, beta_1)
    nodes = taus[[i - k for k in range(order)]]
    weights = []
    for j in range(order):
        basis = torch.ones_like(grid)
        for k in range(order):
            if k != j:
                basis = basis * ((grid - nodes[k]) / (nodes[j] - nodes[k]))
        weights.append(float(torch.sum(integrand * basis) * dtau))
    return tuple(weights)


@functools.lru_cache(maxsize=256)
def deis_tab_table(ts, max_order):
    """DEIS tAB as the official code computes it: Euler on the first step, then
    `deis_tab_weights`."""
    taus, beta_0, beta_1 = deis_vp_times(ts)
    rows = []
    for i, p in enumerate(solver_utils.step_orders(len(ts) - 1, max_order)):
        weights = (ts[i + 1] - ts[i],) if p == 1 else deis_tab_weights(taus, i, p, beta_0, beta_1)
        rows.append((1.0, weights))
    return tuple(rows)


def deis_rhoab_failure(num_points, max_order):
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
def deis_rhoab_table(ts, max_order):
    """DEIS rhoAB as the official code runs it: our exact Lagrange-in-sigma weights (its closed
    forms are the same integrals) up to step 3; with max_order 4 every later step reuses step 3's
    weights (see deis_rhoab_failure)."""
    failure = deis_rhoab_failure(len(ts), max_order)
    if failure:
        raise ValueError(failure)
    rows = solver_utils.adams_table(ts, max_order, 'sigma', 'eps')
    return rows[:4] + rows[3:4] * max(0, len(rows) - 4)


# The official tables, by the names the solvers ask for (solvers.TABLES holds ours).
TABLES = {
    'ipndm': solver_utils.ipndm_table,          # the same as ours
    'ipndm_v': ipndm_v_table,
    'deis_tab': deis_tab_table,
    'deis_rhoab': deis_rhoab_table,
    'dpmpp': dpmpp_table,
    'unipc': unipc_table,
}


# ----------------------------------------------------------------------------------------------
# 4. Options: the official always thresholds the data prediction of dpmpp and unipc; it crashes
# on some options; its --max_order has no default.

def resolve_options(solver, given, out, num_points):
    """Our resolved options `out` (of the user's `given` ones) as the official runs them:
    thresholding on for a data prediction; ValueError where the official cannot run them (some
    checks need `num_points`, the schedule's length)."""
    if 'thresholding' in out and out.get('predict_x0'):
        if given.get('thresholding') is False:
            raise ValueError(f'--thresholding: --compat={NAME} always thresholds the data prediction, as the '
                             'official code does (drop --thresholding=False or --compat)')
        out['thresholding'] = True
    if solver in ('ipndm', 'ipndm_v', 'deis') and int(out['max_order']) == 1:
        raise ValueError(f'--max_order: the official gits-main {solver} crashes with max_order=1 (its history '
                         f'buffer update fails after the first step); use 2..4 with --compat={NAME}')
    if solver == 'deis' and out['deis_mode'] == 'rhoab' and num_points is not None:
        failure = deis_rhoab_failure(int(num_points), int(out['max_order']))
        if failure:
            raise ValueError(failure)
    return out


def max_order_failure(solver, spec, options, role='--solver'):
    """Why the official command line fails for `solver` (its solvers.SOLVER_SPECS entry `spec`)
    without --max_order (None: it does not, or the option is given). Its --max_order has no default
    and every multistep sampler asserts on it, so a run of ipndm, ipndm_v, deis, dpmpp or unipc - as
    the student, or as the GITS teacher, which gets the same flags - needs it on the command line."""
    if spec.max_order_range is None or options.get('max_order') is not None:
        return None
    return (f'--max_order: the official gits-main has no default for it, and its {solver} ({role}) fails '
            f'without one; pass it with --compat={NAME}, as the official commands do (e.g. --max_order=4)')


def extra_evals(solver, num_points, options):
    """Evaluations beyond the steps' that the official spends (UniPC's last-step corrector)."""
    if solver != 'unipc':
        return 0
    return int(unipc_corrects_last_step(num_points - 1, int(options['max_order'])))


# ----------------------------------------------------------------------------------------------
# 5. The search (gits.py). The official passes one set of solver flags to the student and to the
# teacher, and its teacher takes the analytical first step with --afs: its first slope, the one
# the costs C[0][j] use, is x / sqrt(1 + t^2), so C[0][1] = 0 and the DP mostly starts [0, 1, ...],
# which leaves the free step no candidate. When it does leave some, the official tries them with
# the student run as in its sampling code, which fails for some solvers (`trial_failure`) and
# gives DEIS the teacher grid's coefficients (`trial_table`).

TEACHER_AFS = True


def check_search(denoise_to_zero):
    if denoise_to_zero:
        raise ValueError(f'--denoise_to_zero: with --dp the official gits-main also denoises its teacher and the '
                         f'free-step candidates to zero (its dev cost then measures from D(x_last)); --compat={NAME} '
                         'does not reproduce that: drop one of them')


def teacher_flags(solver, solver_tea, given, specs):
    """The teacher's option flags: the flags as given (the official defaults fill the rest);
    ValueError where the official search cannot run this student and teacher (specs:
    solvers.SOLVER_SPECS)."""
    if solver_tea == 'unipc':
        raise ValueError(f'--solver_tea: the official gits-main has no UniPC teacher (its UniPC returns no slopes); '
                         f'choose another teacher with --compat={NAME}')
    for name, role in ((solver_tea, '--solver_tea, the teacher'), (solver, '--solver')):
        failure = max_order_failure(name, specs[name], given, role)
        if failure:
            raise ValueError(failure)
    return {k: v for k, v in given.items() if k in specs[solver_tea].defaults}


def trial_failure(solver, options, num_steps, solver_tea, schedule_type):
    """Why the official free-step search fails when it has candidates to try (None: it runs)."""
    if solver == 'unipc':
        return (f'--afs: the official gits-main free-step search has no UniPC (it fails when the DP leaves '
                f'room for the free step, as here); use --afs=False or another solver with --compat={NAME}')
    if solver == 'dpmpp' and options['lower_order_final'] and num_steps >= int(options['max_order']):
        return (f'--lower_order_final: the official gits-main runs the free-step candidates ({num_steps} + 1 points) '
                f'as if they had {num_steps}, which gives the last step order 0 and fails; pass '
                f'--lower_order_final=False or --afs=False with --compat={NAME}')
    if solver == 'deis' and (solver_tea != 'deis' or schedule_type == 'discrete'):
        return (f'--afs: the official gits-main free-step search of DEIS fails (it reuses the teacher\'s DEIS '
                f'coefficients, so it needs --solver_tea=deis, and a non-discrete schedule); change one of them '
                f'with --compat={NAME}')
    return None


def trial_table(solver, options, t_tea):
    """How the official runs a free-step candidate schedule where it differs from the student
    solver with afs: for DEIS, a function of the candidate giving its coefficient rows, those of the
    teacher grid (its coefficient list is computed for the teacher's schedule and reused; the first
    step is Euler on the candidate's own step). None for the other solvers."""
    if solver != 'deis':
        return None
    grid = tuple(float(t) for t in t_tea)
    rows = TABLES['deis_' + options['deis_mode']](grid, int(options['max_order']))

    def table(trial):
        first = ((1.0, (float(trial[1]) - float(trial[0]),)),)
        return first + rows[1:len(trial) - 1]
    return table


# ----------------------------------------------------------------------------------------------

class GitsMain:
    """What the default code asks a reproduced code base for (schedules.compat_mode)."""
    name = NAME
    schedules = SCHEDULES
    tables = TABLES
    teacher_afs = TEACHER_AFS
    resolve_options = staticmethod(resolve_options)
    max_order_failure = staticmethod(max_order_failure)
    extra_evals = staticmethod(extra_evals)
    check_search = staticmethod(check_search)
    teacher_flags = staticmethod(teacher_flags)
    trial_failure = staticmethod(trial_failure)
    trial_table = staticmethod(trial_table)


schedules.COMPAT_MODES[NAME] = GitsMain()
