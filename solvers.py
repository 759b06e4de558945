"""ODE solvers for the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

Every solver has one signature,

    fn(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None, **options)

`x` is already at noise level t_steps[0]. It returns the final x, or (x, inters) where inters
stacks the trajectory at every point of t_steps (plus D(x_last) with denoise_to_zero).
`SOLVERS` maps names to functions; `SOLVER_SPECS` records each solver's options, their defaults
and ranges, and its denoiser evaluations per step (for NFE accounting).

compat='gits-main' reproduces the official GITS code (gits_main.py): the multistep solvers take
its coefficient tables (`tables`), its option defaults and its refusals (`resolve_options`).
"""

import dataclasses

import gits_main       # noqa: F401  (registers --compat=gits-main: schedules.COMPAT_MODES)
import solver_utils
from schedules import compat_mode
from solver_utils import History, afs_slope, combine, dynamic_threshold, finish


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


def _check_thresholding(solver, given):
    """Only dpmpp and unipc threshold, and only a data prediction."""
    spec = SOLVER_SPECS[solver]
    takes = 'thresholding' in spec.defaults
    data_prediction = takes and given.get('predict_x0', spec.defaults.get('predict_x0'))
    if 'thresholding' in given and not data_prediction and (given['thresholding'] or not takes):
        has = 'it has --predict_x0=False' if takes else 'it has none'
        raise ValueError(f'--thresholding: only dpmpp and unipc with --predict_x0=True threshold a data '
                         f'prediction (solver "{solver}": {has})')


def resolve_options(solver, options, compat=None, num_points=None):
    """Validate the user's options for `solver` (None means 'not given') and fill in defaults.
    With `compat`, the reproduced code's defaults, and a refusal of what it cannot run (some checks
    need `num_points`, the schedule's length). Raises ValueError with one line naming the flag and
    the allowed values."""
    mode = compat_mode(compat)
    if solver not in SOLVERS:
        raise ValueError(f'--solver: unknown solver "{solver}"; choose one of {", ".join(SOLVERS)}')
    spec = SOLVER_SPECS[solver]
    given = {k: v for k, v in options.items() if v is not None}
    _check_thresholding(solver, given)
    for key in given:
        if key not in spec.defaults:
            takes = ', '.join('--' + k for k in spec.defaults) or 'no options'
            raise ValueError(f'--{key}: not an option of solver "{solver}" (it takes {takes})')
    if 'max_order' in given:
        lo, hi = spec.max_order_range
        if not (lo <= int(given['max_order']) <= hi):
            raise ValueError(f'--max_order: must be in {lo}..{hi} for solver "{solver}" (got {given["max_order"]})')
    for key, choices in OPTION_CHOICES.items():
        if key in given and given[key] not in choices:
            raise ValueError(f'--{key}: must be one of {", ".join(choices)} (got "{given[key]}")')
    out = dict(spec.defaults, **given)
    if 'thresholding' in out:
        out['thresholding'] = bool(out['thresholding'])
    return mode.resolve_options(solver, given, out, num_points) if mode else out


def official_max_order_failure(solver, options, compat, role='--solver'):
    """Why the reproduced code's command line (compat) fails for `solver` without --max_order
    (None: it does not, or there is no compat)."""
    mode = compat_mode(compat)
    return mode.max_order_failure(solver, SOLVER_SPECS[solver], options, role) if mode else None


def count_nfe(solver, num_points, afs=False, denoise_to_zero=False, compat=None, **options):
    """Denoiser evaluations used by `solver` on a schedule of `num_points` noise levels (options:
    the solver's, None or missing for its default; they matter only where compat changes the count)."""
    mode = compat_mode(compat)
    spec = SOLVER_SPECS[solver]
    extra = 0
    if mode:
        given = {k: v for k, v in options.items() if v is not None and k in spec.defaults}
        extra = mode.extra_evals(solver, num_points, dict(spec.defaults, **given))
    return (num_points - 1) * spec.evals_per_step + extra - int(bool(afs)) + int(bool(denoise_to_zero))


def _floats(t_steps):
    return [float(t) for t in t_steps]


def _one_step_checked(name, compat):
    """euler, heun and dpm take no options, and the official code computes them as we do."""
    resolve_options(name, {}, compat)


# ----------------------------------------------------------------------------------------------

@register('euler')
def euler(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None):
    """Explicit Euler in sigma."""
    _one_step_checked('euler', compat)
    ts = _floats(t_steps)
    inters = [x]
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = afs_slope(x, t_cur) if (afs and i == 0) else (x - denoise(x, t_cur)) / t_cur
        x = x + (t_next - t_cur) * d
        inters.append(x)
    return finish(denoise, x, ts[-1], inters, denoise_to_zero, return_inters)


@register('heun', evals_per_step=2)
def heun(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None):
    """Heun's second-order method (EDM's deterministic sampler): Euler predictor, trapezoidal
    corrector, 2 evaluations a step."""
    _one_step_checked('heun', compat)
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
def dpm(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None):
    """DPM-Solver-2 (r = 1/2) in EDM variables: in noise prediction the exponential integrator
    is Euler in sigma, so it is an Euler half step to the geometric midpoint sqrt(t t_next) (the
    midpoint in lambda) followed by a full step with the midpoint slope. 2 evaluations a step."""
    _one_step_checked('dpm', compat)
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
# Multistep solvers: a coefficient table (once per schedule) and one loop.

TABLES = {   # ours; a reproduced code base (compat) brings its own (gits_main.TABLES)
    'ipndm': solver_utils.ipndm_table,
    'ipndm_v': lambda ts, max_order: solver_utils.adams_table(ts, max_order, 'sigma', 'eps'),
    'deis_tab': lambda ts, max_order: solver_utils.adams_table(ts, max_order, 'vp_time', 'eps'),
    'deis_rhoab': lambda ts, max_order: solver_utils.adams_table(ts, max_order, 'sigma', 'eps'),
    'dpmpp': solver_utils.dpmpp_table,
    'unipc': solver_utils.unipc_table,
}


def tables(compat=None):
    """The coefficient table builders: ours, or those of the code base `compat` reproduces."""
    mode = compat_mode(compat)
    return mode.tables if mode else TABLES


def _output(denoise, x, t, form, thresholding, sigma=None):
    """The model output a table combines: D ('x0', optionally thresholded) or the slope
    d = (x - D) / t ('eps'); D evaluated at noise level `sigma` (None: t; learned coefficients
    may shift it, see below)."""
    D = denoise(x, t if sigma is None else sigma)
    if form == 'eps':
        return (x - D) / t
    return dynamic_threshold(D) if thresholding else D


def _first_output(denoise, x, t, form, thresholding, afs, sigma=None):
    if not afs:
        return _output(denoise, x, t, form, thresholding, sigma)
    d = afs_slope(x, t)                 # no network call
    if form == 'eps':
        return d
    return dynamic_threshold(x - t * d) if thresholding else x - t * d


def _multistep(denoise, x, ts, table, form, afs, denoise_to_zero, return_inters, corrector=None,
               thresholding=False, sigmas=None):
    """Run x_{i+1} = a x_i + sum_k w_k m_{i-k} for every row of `table`. With `corrector` (UniC),
    the output at the predicted point is used to correct x_{i+1} and becomes the newest history
    entry, so the corrector costs no extra evaluation. A step is followed by an evaluation when
    another step follows or when it is corrected (corrector[i] not None: after the last step,
    only in compat mode). `sigmas`: the noise level of every model output's evaluation, in order
    (None: the schedule's own, ts[j] for the output at ts[j])."""
    at = (lambda j: None) if sigmas is None else (lambda j: sigmas[j])
    history = History(max(len(w) for _, w in table) + (1 if corrector else 0))
    history.push(_first_output(denoise, x, ts[0], form, thresholding, afs, at(0)))
    inters = [x]
    last = len(table) - 1
    for i, (a, weights) in enumerate(table):
        x_next = combine(a, x, weights, history)
        correction = corrector[i] if corrector is not None else None
        if i < last or correction is not None:
            m = _output(denoise, x_next, ts[i + 1], form, thresholding, at(i + 1))
            if correction is not None:
                a_c, weights_c = correction
                x_next = combine(a_c, x, weights_c, [m, *history])
            history.push(m)
        x = x_next
        inters.append(x)
    return finish(denoise, x, ts[-1], inters, denoise_to_zero, return_inters)


def run_table(denoise, x, t_steps, table, *, afs=False, return_inters=False):
    """A noise-prediction multistep run with a given coefficient table (rows (a, weights) as
    solver_utils builds them). Only for reproducing runs whose coefficients do not belong to their
    schedule (the official GITS free-step search, gits.py); the solvers build their own."""
    return _multistep(denoise, x, tuple(_floats(t_steps)), table, 'eps', afs, False, return_inters)


def _validated(name, compat, ts, **options):
    """Direct Python callers get the same checks as the command line (ValueError)."""
    return resolve_options(name, options, compat, num_points=len(ts))


# Learned coefficients (issue 29). A multistep solver's table fixes, per step, the weights of the
# model outputs; `coefficients` replaces those weights by an explicit table of the same shape
# (the factor `a` of x_i stays the analytic one: it is the exact solution's linear part), and may
# move the noise level at which each output is evaluated:
#
#     dict(predictor=[[w_i0, w_i1, ...] for every step i]          (newest output first)
#          corrector=[[w_i0, ...] or None for every step i]         (unipc only)
#          sigmas=[s_0, s_1, ...])                                  (optional)
#
# sigmas[j] is the noise level passed to the denoiser for the output at t_j (the solver still
# combines it as the output at t_j: the slope divides by t_j); absent, s_j = t_j. With afs the
# first output is not evaluated, and s_0 must be t_0. A learned s_j != t_j lets the fit correct
# the state's own error (the student's x_j is not exactly on the teacher's trajectory at t_j);
# the fit with these shifts beats the weights alone by far (docs/gits.md). None: the analytic
# solver. The analytic table in this form (`analytic_coefficients`) gives the same run bit for
# bit, because the floats are the same.

def _weights(rows):
    return [None if r is None else [float(w) for w in r[1]] for r in rows]


def coefficients_of(table, corrector=None):
    """The weights of (table, corrector) in the `coefficients` form."""
    out = dict(predictor=_weights(table))
    if corrector is not None:
        out['corrector'] = _weights(corrector)
    return out


def output_count(table, corrector=None):
    """The model outputs a run of (table, corrector) combines: one at t_0 and one after every step
    that another step follows or that is corrected. Also for the rows of a `coefficients` table
    (its predictor and corrector lists)."""
    return len(table) + int(corrector is not None and corrector[-1] is not None)


def _replaced(rows, weights, part):
    if weights is None or len(weights) != len(rows):
        raise ValueError(f'coefficients: the {part} table has {"no" if weights is None else len(weights)} rows, '
                         f'the solver {len(rows)} steps')
    out = []
    for i, (row, w) in enumerate(zip(rows, weights)):
        if (row is None) != (w is None) or (row is not None and len(w) != len(row[1])):
            want = 'none' if row is None else f'{len(row[1])} weights'
            raise ValueError(f'coefficients: {part} step {i} has {"none" if w is None else len(w)}, the solver {want}')
        out.append(None if row is None else (row[0], tuple(float(v) for v in w)))
    return tuple(out)


def _evaluation_sigmas(sigmas, count, afs_t0):
    if sigmas is None:
        return None
    if len(sigmas) != count or not all(float(s) > 0 for s in sigmas):
        raise ValueError(f'coefficients: sigmas must be {count} positive noise levels, one per model output '
                         f'(got {len(sigmas)})')
    if afs_t0 is not None and float(sigmas[0]) != float(afs_t0):
        raise ValueError(f'coefficients: with afs the first output is not evaluated, so sigmas[0] must be '
                         f't_0 = {float(afs_t0)!r} (got {float(sigmas[0])!r})')
    return tuple(float(s) for s in sigmas)


def with_coefficients(table, corrector, coefficients, afs_t0=None):
    """(table, corrector, evaluation sigmas or None) with the weights and noise levels of
    `coefficients` (None: unchanged); afs_t0: the schedule's t_0 when afs saves the first
    evaluation (its noise level must stay t_0). ValueError in one line when the shapes differ
    (other solver, max_order, length or form options)."""
    if coefficients is None:
        return table, corrector, None
    parts = {'predictor', 'corrector'} if corrector is not None else {'predictor'}
    if set(coefficients) - {'sigmas'} != parts:
        raise ValueError(f'coefficients: parts {sorted(coefficients)} do not fit this solver')
    sigmas = _evaluation_sigmas(coefficients.get('sigmas'), output_count(table, corrector), afs_t0)
    table = _replaced(table, coefficients['predictor'], 'predictor')
    if corrector is not None:
        corrector = _replaced(corrector, coefficients['corrector'], 'corrector')
    return table, corrector, sigmas


MULTISTEP = {}      # name -> fn(ts, compat, **resolved options) -> (form, table, corrector or None)


def multistep_tables(name, t_steps, compat=None, **options):
    """The analytic (form, table, corrector) of multistep solver `name` on t_steps, options
    resolved (None or missing: the default)."""
    ts = tuple(_floats(t_steps))
    opts = _validated(name, compat, ts, **{k: v for k, v in options.items() if v is not None})
    return MULTISTEP[name](ts, compat, **opts)


def analytic_coefficients(name, t_steps, compat=None, **options):
    """The analytic weights of multistep solver `name` on t_steps, in the `coefficients` form."""
    _, table, corrector = multistep_tables(name, t_steps, compat, **options)
    return coefficients_of(table, corrector)


def _run_multistep(name, denoise, x, t_steps, afs, denoise_to_zero, return_inters, compat, coefficients, **options):
    ts = tuple(_floats(t_steps))
    opts = _validated(name, compat, ts, **options)
    form, table, corrector = MULTISTEP[name](ts, compat, **opts)
    table, corrector, sigmas = with_coefficients(table, corrector, coefficients, ts[0] if afs else None)
    return _multistep(denoise, x, ts, table, form, afs, denoise_to_zero, return_inters, corrector=corrector,
                      thresholding=opts.get('thresholding', False), sigmas=sigmas)


def _eps_table(key):
    return lambda ts, compat, max_order, **kw: ('eps', tables(compat)[key](ts, int(max_order)), None)


MULTISTEP['ipndm'] = _eps_table('ipndm')
MULTISTEP['ipndm_v'] = _eps_table('ipndm_v')
MULTISTEP['deis'] = lambda ts, compat, max_order, deis_mode: _eps_table('deis_' + deis_mode)(ts, compat, max_order)


@register('ipndm', max_order_range=(1, 4), max_order=4)
def ipndm(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None,
          max_order=4, coefficients=None):
    """Improved PNDM: Adams-Bashforth on d with the fixed equal-step weights, order growing with
    the history up to max_order (order max_order only on grids uniform in sigma)."""
    return _run_multistep('ipndm', denoise, x, t_steps, afs, denoise_to_zero, return_inters, compat, coefficients,
                          max_order=max_order)


@register('ipndm_v', max_order_range=(1, 4), max_order=4)
def ipndm_v(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None,
            max_order=4, coefficients=None):
    """iPNDM with variable steps: the Adams-Bashforth weights of the actual step sizes (the
    integral over the step of the polynomial through the last max_order slopes, in sigma)."""
    return _run_multistep('ipndm_v', denoise, x, t_steps, afs, denoise_to_zero, return_inters, compat, coefficients,
                          max_order=max_order)


@register('deis', max_order_range=(1, 4), max_order=4, deis_mode='tab')
def deis(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None,
         max_order=4, deis_mode='tab', coefficients=None):
    """DEIS: exponential integrator with the noise prediction interpolated by a polynomial.
    'tab': polynomial in VP time (the time_uniform map over this schedule's sigma range),
    integrated against the exponential-integrator weight, which in EDM variables is dsigma/dt
    (quadrature). 'rhoab': polynomial in rho = sigma, integrated exactly (this equals ipndm_v)."""
    return _run_multistep('deis', denoise, x, t_steps, afs, denoise_to_zero, return_inters, compat, coefficients,
                          max_order=max_order, deis_mode=deis_mode)


def _form(predict_x0):
    return 'x0' if predict_x0 else 'eps'


def _dpmpp_tables(ts, compat, max_order, predict_x0, lower_order_final, thresholding):
    form = _form(predict_x0)
    return form, tables(compat)['dpmpp'](ts, int(max_order), form, bool(lower_order_final)), None


def _unipc_tables(ts, compat, max_order, predict_x0, lower_order_final, variant, thresholding):
    form = _form(predict_x0)
    return (form, *tables(compat)['unipc'](ts, int(max_order), form, variant, bool(lower_order_final)))


MULTISTEP['dpmpp'] = _dpmpp_tables
MULTISTEP['unipc'] = _unipc_tables


@register('dpmpp', max_order_range=(1, 3), max_order=3, predict_x0=True, lower_order_final=True,
          thresholding=False)
def dpmpp(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None,
          max_order=3, predict_x0=True, lower_order_final=True, thresholding=None, coefficients=None):
    """DPM-Solver++ multistep (orders 1-3), data prediction (predict_x0) or noise prediction.
    Order 3 integrates the quadratic interpolant exactly (not the published 3M update, which
    compat='gits-main' uses; see solver_utils.dpmpp_table). thresholding (data prediction only;
    default off, on with compat): dynamic thresholding of every data prediction."""
    return _run_multistep('dpmpp', denoise, x, t_steps, afs, denoise_to_zero, return_inters, compat, coefficients,
                          max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                          thresholding=thresholding)


@register('unipc', max_order_range=(1, 3), max_order=3, predict_x0=True,
          lower_order_final=True, variant='bh2', thresholding=False)
def unipc(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, compat=None,
          max_order=3, predict_x0=True, lower_order_final=True, variant='bh2', thresholding=None, coefficients=None):
    """UniPC: UniP-p predictor and UniC-p corrector (orders 1-3), variants bh1/bh2. The corrector
    reuses the evaluation at the predicted point, which also serves the next step (ours: no
    corrector after the last step). thresholding as in dpmpp."""
    return _run_multistep('unipc', denoise, x, t_steps, afs, denoise_to_zero, return_inters, compat, coefficients,
                          max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                          variant=variant, thresholding=thresholding)
