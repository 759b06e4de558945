"""ODE solvers for the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

Every solver has one signature,

    fn(denoise, x, t_steps, *, afs=False, denoise_to_zero=False, return_inters=False, **options)

`x` is already at noise level t_steps[0]. It returns the final x, or (x, inters) where inters
stacks the trajectory at every point of t_steps (plus D(x_last) with denoise_to_zero).
`SOLVERS` maps names to functions; `SOLVER_SPECS` records each solver's options, their defaults
and ranges, and its denoiser evaluations per step (for NFE accounting).
"""

import dataclasses

import torch

from solver_utils import afs_slope, finish


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
