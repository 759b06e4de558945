"""ODE solvers for the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

Every solver has one signature,

    fn(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, **options)

`x` is already at noise level t_steps[0]. It returns the final x, or (x, inters) where inters
stacks the trajectory at every point of t_steps (plus D(x_last) with denoise_to_zero).
`SOLVERS` maps names to functions; `SOLVER_SPECS` records each solver's options, their defaults
and ranges, and its denoiser evaluations per step (for NFE accounting).
"""

import dataclasses


import solver_utils
from solver_utils import History, afs_slope, combine, finish


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    evals_per_step: int = 1
    defaults: dict = dataclasses.field(default_factory=dict)   # option -> default
    max_order_range: tuple = None                              # (lo, hi) when max_order is taken


SOLVERS = {}
SOLVER_SPECS = {}

OPTION_CHOICES = {'variant': ('bh1', 'bh2'), 'deis_mode': ('tab', 'rhoab')}


def register(name, evals_per_step=1, max_order_range=None, **defaults):
    def decorator(fn):
        SOLVERS[name] = fn
        SOLVER_SPECS[name] = SolverSpec(evals_per_step, dict(defaults), max_order_range)
        return fn
    return decorator


def resolve_options(solver, options):
    """Validate the user's options for `solver` (None means 'not given') and fill in defaults.
    Raises ValueError with one line naming the flag and the allowed values."""
    if solver not in SOLVERS:
        raise ValueError(f'--solver: unknown solver "{solver}"; choose one of {", ".join(SOLVERS)}')
    spec = SOLVER_SPECS[solver]
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in spec.defaults:
            takes = ', '.join('--' + k for k in spec.defaults) or 'no options'
            raise ValueError(f'--{key}: not an option of solver "{solver}" (it takes {takes})')
    out = dict(spec.defaults, **given)
    if 'max_order' in given:
        lo, hi = spec.max_order_range
        if not (lo <= int(given['max_order']) <= hi):
            raise ValueError(f'--max_order: must be in {lo}..{hi} for solver "{solver}" (got {given["max_order"]})')
    for key, choices in OPTION_CHOICES.items():
        if key in given and given[key] not in choices:
            raise ValueError(f'--{key}: must be one of {", ".join(choices)} (got "{given[key]}")')
    return out


def count_nfe(solver, num_points, afs=False, denoise_to_zero=False):
    """Denoiser evaluations used by `solver` on a schedule of `num_points` noise levels."""
    steps = num_points - 1
    return steps * SOLVER_SPECS[solver].evals_per_step - int(bool(afs)) + int(bool(denoise_to_zero))


def _floats(t_steps):
    return [float(t) for t in t_steps]


# ----------------------------------------------------------------------------------------------

@register('euler')
def euler(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False):
    """Explicit Euler in sigma."""
    ts = _floats(t_steps)
    inters = [x]
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = afs_slope(x, t_cur) if (afs and i == 0) else (x - denoise(x, t_cur)) / t_cur
        x = x + (t_next - t_cur) * d
        inters.append(x)
    return finish(denoise, x, ts[-1], inters, denoise_to_zero, return_inters)


@register('heun', evals_per_step=2)
def heun(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False):
    """Heun's second-order method (EDM's deterministic sampler): Euler predictor, trapezoidal
    corrector, 2 evaluations a step."""
    ts = _floats(t_steps)
    inters = [x]
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_next - t_cur
        d = afs_slope(x, t_cur) if (afs and i == 0) else (x - denoise(x, t_cur)) / t_cur
        x_pred = x + h * d
        if t_next > 0:
            d_next = (x_pred - denoise(x_pred, t_next)) / t_next
            x = x + h * 0.5 * (d + d_next)
        else:
            x = x_pred
        inters.append(x)
    return finish(denoise, x, ts[-1], inters, denoise_to_zero, return_inters)


@register('dpm', evals_per_step=2)
def dpm(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False):
    """DPM-Solver-2 (r = 1/2) in EDM variables: in noise prediction the exponential integrator
    is Euler in sigma, so it is an Euler half step to the geometric midpoint sqrt(t t_next) (the
    midpoint in lambda) followed by a full step with the midpoint slope. 2 evaluations a step."""
    ts = _floats(t_steps)
    inters = [x]
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = afs_slope(x, t_cur) if (afs and i == 0) else (x - denoise(x, t_cur)) / t_cur
        t_mid = (t_cur * t_next) ** 0.5
        x_mid = x + (t_mid - t_cur) * d
        d_mid = (x_mid - denoise(x_mid, t_mid)) / t_mid
        x = x + (t_next - t_cur) * d_mid
        inters.append(x)
    return finish(denoise, x, ts[-1], inters, denoise_to_zero, return_inters)


# ----------------------------------------------------------------------------------------------
# Multistep solvers: a coefficient table from solver_utils (once per schedule) and one loop.

def _output(denoise, x, t, form):
    """The model output a table combines: D ('x0') or the slope d = (x - D) / t ('eps')."""
    D = denoise(x, t)
    return D if form == 'x0' else (x - D) / t


def _first_output(denoise, x, t, form, afs):
    if not afs:
        return _output(denoise, x, t, form)
    d = afs_slope(x, t)                 # no network call
    return x - t * d if form == 'x0' else d


def _multistep(denoise, x, ts, table, form, afs, denoise_to_zero, return_inters, corrector=None):
    """Run x_{i+1} = a x_i + sum_k w_k m_{i-k} for every row of `table`. With `corrector` (UniC),
    the output at the predicted point is used to correct x_{i+1} and becomes the newest history
    entry, so the corrector costs no extra evaluation; no evaluation follows the last step."""
    history = History(max(len(w) for _, w in table) + (1 if corrector else 0))
    history.push(_first_output(denoise, x, ts[0], form, afs))
    inters = [x]
    last = len(table) - 1
    for i, (a, weights) in enumerate(table):
        x_next = combine(a, x, weights, history)
        if i < last:
            m = _output(denoise, x_next, ts[i + 1], form)
            if corrector is not None and corrector[i] is not None:
                a_c, weights_c = corrector[i]
                x_next = combine(a_c, x, weights_c, [m, *history])
            history.push(m)
        x = x_next
        inters.append(x)
    return finish(denoise, x, ts[-1], inters, denoise_to_zero, return_inters)


def _validated(name, **options):
    """Direct Python callers get the same checks as the command line (ValueError)."""
    return resolve_options(name, options)


@register('ipndm', max_order_range=(1, 4), max_order=4)
def ipndm(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, max_order=4):
    """Improved PNDM: Adams-Bashforth on d with the fixed equal-step weights, order growing with
    the history up to max_order (order max_order only on grids uniform in sigma)."""
    _validated('ipndm', max_order=max_order)
    ts = tuple(_floats(t_steps))
    return _multistep(denoise, x, ts, solver_utils.ipndm_table(ts, int(max_order)), 'eps',
                      afs, denoise_to_zero, return_inters)


@register('ipndm_v', max_order_range=(1, 4), max_order=4)
def ipndm_v(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, max_order=4):
    """iPNDM with variable steps: the Adams-Bashforth weights of the actual step sizes (the
    integral over the step of the polynomial through the last max_order slopes, in sigma)."""
    _validated('ipndm_v', max_order=max_order)
    ts = tuple(_floats(t_steps))
    table = solver_utils.adams_table(ts, int(max_order), 'sigma', 'eps')
    return _multistep(denoise, x, ts, table, 'eps', afs, denoise_to_zero, return_inters)


DEIS_SPACES = {'tab': 'vp_time', 'rhoab': 'sigma'}


@register('deis', max_order_range=(1, 4), max_order=4, deis_mode='tab')
def deis(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, max_order=4,
         deis_mode='tab'):
    """DEIS: exponential integrator with the noise prediction interpolated by a polynomial.
    'tab': polynomial in VP time (the time_uniform map over this schedule's sigma range),
    integrated against the exponential-integrator weight, which in EDM variables is dsigma/dt
    (quadrature). 'rhoab': polynomial in rho = sigma, integrated exactly (this equals ipndm_v)."""
    _validated('deis', max_order=max_order, deis_mode=deis_mode)
    ts = tuple(_floats(t_steps))
    table = solver_utils.adams_table(ts, int(max_order), DEIS_SPACES[deis_mode], 'eps')
    return _multistep(denoise, x, ts, table, 'eps', afs, denoise_to_zero, return_inters)


def _form(predict_x0):
    return 'x0' if predict_x0 else 'eps'


@register('dpmpp', max_order_range=(1, 3), max_order=3, predict_x0=True, lower_order_final=True)
def dpmpp(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, max_order=3,
          predict_x0=True, lower_order_final=True):
    """DPM-Solver++ multistep (orders 1-3), data prediction (predict_x0) or noise prediction."""
    _validated('dpmpp', max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final)
    ts = tuple(_floats(t_steps))
    form = _form(predict_x0)
    table = solver_utils.dpmpp_table(ts, int(max_order), form, bool(lower_order_final))
    return _multistep(denoise, x, ts, table, form, afs, denoise_to_zero, return_inters)


@register('unipc', max_order_range=(1, 3), max_order=3, predict_x0=True, lower_order_final=True, variant='bh2')
def unipc(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, max_order=3,
          predict_x0=True, lower_order_final=True, variant='bh2'):
    """UniPC: UniP-p predictor and UniC-p corrector (orders 1-3), variants bh1/bh2. The corrector
    reuses the evaluation at the predicted point, which also serves the next step."""
    _validated('unipc', max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
               variant=variant)
    ts = tuple(_floats(t_steps))
    form = _form(predict_x0)
    pred, corr = solver_utils.unipc_table(ts, int(max_order), form, variant, bool(lower_order_final))
    return _multistep(denoise, x, ts, pred, form, afs, denoise_to_zero, return_inters, corrector=corr)
