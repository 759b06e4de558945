"""sample.py's command line, resolved once.

`resolve(kwargs, given)` turns click's values into one frozen `Options` record: it parses the
seeds and the schedule, resolves the solver's and the GITS teacher's options, applies the rules of
which flags apply to which run, checks every value that needs no model, and reads a schedule file.
Every later stage (run_schedule, run_record, sample.run) reads the record; none adds to it.

The method's defaults are defined once, where the method is (gits.METRIC, COEFF, SOLVER_TEA,
NUM_STEPS_TEA, NUM_WARMUP, WARMUP_SEED; solvers.SOLVER_SPECS for each solver's own options);
the command lines take them from there.
"""

import collections
import dataclasses
import math

import numpy as np

import dnnlib
import gits
import models
import run_schedule
import schedules
import solvers
import student_search
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc

RESOLVED = {'resolved': True}     # field metadata: derived by resolve(), not a command-line flag
ADDED = {'omit_default': True}    # field metadata: a later flag, left out of run.json's options at its default
                                  # (so that the run.json of a run without it keeps its bytes)


@dataclasses.dataclass(frozen=True)
class Options:
    """A sample.py run. The first fields are the command-line flags as click parsed them, in
    --help order (None: not given; the model's or the solver's own value applies; the defaults are
    sample.py's click options'); the last ones are what resolve() derives from them."""
    # General.
    dataset_name: str
    model_path: str
    batch: int
    seeds: str
    grid: bool
    subdirs: bool
    outdir: str
    device: str
    class_idx: int
    use_fp16: bool
    dtype: str
    resolution: str
    # Solver.
    solver: str
    num_steps: int
    afs: bool
    denoise_to_zero: bool
    # Schedule.
    schedule_type: str
    schedule_rho: float
    t_steps: str
    schedule_format: str
    sigma_min: float
    sigma_max: float
    # Solver option flags (None: the solver's default, solvers.SOLVER_SPECS).
    max_order: int
    predict_x0: bool
    lower_order_final: bool
    variant: str
    deis_mode: str
    thresholding: bool
    compat: str
    # Guidance.
    guidance_type: str
    guidance_rate: float
    prompt: str
    prompt_file: str
    negative_prompt: str
    # GITS search.
    dp: bool
    metric: str
    coeff: float
    num_warmup: int
    solver_tea: str
    num_steps_tea: int
    warmup_seed: int
    save_schedules: str
    save_num_steps: str
    schedule_file: str
    search: str
    refine: bool
    refine_budget: float
    refine_coefficients: bool = dataclasses.field(default=False, metadata=ADDED)
    # Resolved by resolve().
    given: frozenset = dataclasses.field(default=frozenset(), metadata=RESOLVED)    # flags named on the command line
    seed_list: tuple = dataclasses.field(default=(), metadata=RESOLVED)
    t_steps_list: list = dataclasses.field(default=None, metadata=RESOLVED)      # --t_steps or the schedule file's entry
    solver_flags: dict = dataclasses.field(default=None, metadata=RESOLVED)      # solver option flags as given
    solver_options: dict = dataclasses.field(default=None, metadata=RESOLVED)    # the student's, resolved
    teacher_options: dict = dataclasses.field(default=None, metadata=RESOLVED)   # the GITS teacher's (--dp)
    save_num_steps_list: list = dataclasses.field(default=None, metadata=RESOLVED)   # --dp: num_steps to search for
    coefficients: dict = dataclasses.field(default=None, metadata=RESOLVED)  # learned weights (schedule file, search)

    def command_line(self):
        """The flags' values, in --help order (run.json's `options`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get('resolved')
                and not (f.metadata.get('omit_default') and getattr(self, f.name) == f.default)}


def frozen(name, values):
    """An immutable record of a smaller command's flag values (trajectory.py's commands)."""
    return collections.namedtuple(name, values)(**values)


SOLVER_FLAGS = ('max_order', 'predict_x0', 'lower_order_final', 'variant', 'deis_mode', 'thresholding')


# ----------------------------------------------------------------------------------------------
# Which flags apply. A flag given where it does not apply is refused in one line that names it and
# what it needs, never ignored. Only flags named on the command line count (not defaults).

SCHEDULE_RULES = (   # (flags, does it apply to this run?, what they need); also trajectory.py's
    (run_schedule.SCHEDULE_FLAGS, lambda o: o.t_steps is None,
     'does not apply with --t_steps (the pasted list is the whole schedule)'),
    (('schedule_rho',), lambda o: o.schedule_type != 'logsnr',
     'does not apply to --schedule_type=logsnr (it has no exponent)'),
)
RULES = SCHEDULE_RULES + (
    (run_schedule.SEARCH_FLAGS, lambda o: o.dp or o.schedule_file is not None,
     'needs --dp=True (it is an option of the GITS search)'),
    (run_schedule.SAVE_FLAGS, lambda o: o.dp,
     'needs --dp=True (it saves searched schedules)'),
    (('refine_budget',), lambda o: bool(o.refine) or not o.dp,
     'needs --refine=True'),
    (('save_num_steps',), lambda o: o.save_schedules is not None,
     'needs --save_schedules=FILE'),
    (run_schedule.SAMPLING_FLAGS, lambda o: o.save_schedules is None,
     'does not apply with --save_schedules (that run searches, saves the schedules and exits)'),
    (('schedule_rho', 'sigma_min', 'sigma_max', 'dp'), lambda o: o.schedule_type != run_schedule.PIPELINE,
     f'does not apply to --schedule_type={run_schedule.PIPELINE} (the pipeline\'s own scheduler sigmas; a GITS search '
     'takes one of the other schedule types as its teacher grid)'),
    (('sigma_min', 'sigma_max'), lambda o: o.compat is None,
     'the official gits-main ignores it (it always takes the model\'s own range), so --compat=gits-main does not '
     'take it'),
    (('search',), lambda o: o.compat is None or o.search in (None, 'gits'),
     'the solver-aware and rotation searches are not in the paper\'s code; --compat=gits-main runs the paper\'s search only'),
    (('metric', 'coeff'), lambda o: o.search != 'rotation' or o.refine,
     'does not apply to --search=rotation (it has no cost matrix and no DP; with --refine=True they shape the GITS '
     'start of the refinement)'),
    (('refine',), lambda o: o.compat is None or not o.refine,
     'refinement is not in the paper\'s code; --compat=gits-main runs the paper\'s search only'),
    (('refine_coefficients',), lambda o: o.compat is None or not o.refine_coefficients,
     'learned coefficients are not in the paper\'s code; --compat=gits-main runs its analytic solvers only'),
    (('refine_coefficients',), lambda o: o.solver in solvers.MULTISTEP or not o.refine_coefficients,
     f'only the multistep solvers have coefficients to learn: {", ".join(solvers.MULTISTEP)}'),
    (('refine_coefficients',), lambda o: bool(o.refine) or not o.dp or not o.refine_coefficients,
     'needs --refine=True (the coefficients are fitted by the refinement)'),
)


# ----------------------------------------------------------------------------------------------
# Resolution. Each helper checks or derives one thing and raises UserError with one line naming
# the flag; resolve() calls them in the order a user meets the errors.

def resolve(kwargs, given=()):
    """The frozen record of a sample.py command line: click's `kwargs` and the flags named on the
    command line (`given`). Every check that needs no model happens here, before anything
    expensive; UserError in one line otherwise."""
    raw = Options(**kwargs, given=frozenset(given))
    seed_list = parse_seeds(raw.seeds)
    if raw.dataset_name not in models.REGISTRY:
        raise UserError(f'--dataset_name: unknown model "{raw.dataset_name}"; choose one of {", ".join(models.REGISTRY)}')
    dist.check_device(raw.device)
    check_one_schedule_source(raw)
    solver_flags = {name: getattr(raw, name) for name in SOLVER_FLAGS}
    try:
        schedules.check_compat(raw.compat)
        t_steps_list = parse_t_steps(raw.t_steps, raw.compat)
        solver_options, teacher_options = resolve_solver_options(raw, solver_flags, t_steps_list)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_sigma_range(raw)
    dnnlib.util.refuse_inapplicable(raw, raw.given, RULES)
    save_num_steps_list = None
    if raw.dp:
        check_search_values(raw, seed_list)
        save_num_steps_list = parse_save_num_steps(raw)
    if raw.save_schedules is not None:
        dnnlib.util.check_writable_file(raw.save_schedules, '--save_schedules')
    coefficients = None
    if raw.schedule_file is not None:
        t_steps_list, coefficients = run_schedule.schedule_from_file(raw, solver_options)
    if raw.outdir is not None:
        dnnlib.util.check_writable_dir(raw.outdir)
    return dataclasses.replace(raw, seed_list=tuple(seed_list), t_steps_list=t_steps_list, solver_flags=solver_flags,
                               solver_options=solver_options, teacher_options=teacher_options,
                               save_num_steps_list=save_num_steps_list, coefficients=coefficients)


def parse_seeds(text):
    try:
        seeds = misc.parse_int_list(text)
    except ValueError as e:
        raise UserError(f'--seeds: {e}; expected e.g. 0-63,100,200-299') from None
    seen = set()
    for s in seeds:
        if s in seen:
            raise UserError(f'--seeds: seed {s} is listed twice (each seed is one image)')
        seen.add(s)
    return seeds


def check_one_schedule_source(opts):
    """Each of --t_steps, --schedule_file and --dp sets the schedule: refuse rather than silently
    pick one."""
    sources = [flag for flag, given in (('--t_steps', opts.t_steps is not None),
                                        ('--schedule_file', opts.schedule_file is not None),
                                        ('--dp', opts.dp)) if given]
    if len(sources) > 1:
        raise UserError(f'{sources[-1]}: cannot be combined with {sources[0]} (each one sets the schedule); drop one of them')


def parse_t_steps(text, compat):
    """--t_steps as a list of floats (None if not given); ValueError naming the flag."""
    if text is None:
        return None
    values = schedules.parse_t_steps(text)
    if compat is not None:     # the official reads --t_steps into a float32 tensor
        values = schedules.check_t_steps(np.float32(values).tolist())
    return values


def resolve_solver_options(opts, solver_flags, t_steps_list):
    """(the student's resolved options, the GITS teacher's or None) from the solver option flags;
    with --dp the teacher takes the student's options, as in the official code
    (gits.search_options). ValueError naming the flag."""
    if opts.dp:
        return gits.search_options(opts.solver, opts.solver_tea, solver_flags, opts.compat, opts.num_steps_tea)
    failure = solvers.official_max_order_failure(opts.solver, solver_flags, opts.compat)
    if failure:
        raise ValueError(failure)
    points = len(t_steps_list) if t_steps_list is not None else opts.num_steps
    return solvers.resolve_options(opts.solver, solver_flags, opts.compat,
                                   num_points=None if opts.schedule_file else points), None


def check_sigma_range(opts):
    if opts.sigma_min is not None and opts.sigma_min <= 0:
        raise UserError(f'--sigma_min: must be positive (got {opts.sigma_min})')
    if opts.sigma_max is not None and opts.sigma_min is not None and opts.sigma_max <= opts.sigma_min:
        raise UserError('--sigma_max: must be larger than --sigma_min')


def check_search_values(opts, seed_list):
    """The GITS values that need no model (--dp)."""
    if opts.coeff is None or not opts.coeff > 0:
        raise UserError(f'--coeff: must be positive (got {opts.coeff})')
    if opts.num_warmup is None or opts.num_warmup < 1:
        raise UserError(f'--num_warmup: must be at least 1 (got {opts.num_warmup})')
    if opts.num_steps_tea < opts.num_steps:
        raise UserError(f'--num_steps_tea: must be at least --num_steps ({opts.num_steps}); got {opts.num_steps_tea}')
    if opts.metric not in gits.METRICS:
        raise UserError(f'--metric: must be one of {", ".join(gits.METRICS)}')
    if opts.search is not None and opts.search not in student_search.SEARCH_MODES:
        raise UserError(f'--search: must be one of {", ".join(student_search.SEARCH_MODES)} (got "{opts.search}")')
    budget = opts.refine_budget
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UserError(f'--refine_budget: must be a positive multiple of the teacher\'s evaluations (got {budget})')
    drawn = opts.num_warmup * (1 + (student_search.CHECK_PER_WARMUP if opts.refine else 0))
    warm = range(opts.warmup_seed, opts.warmup_seed + drawn)        # with --refine, also its check seeds
    if opts.save_schedules is None and any(s in warm for s in seed_list):
        kind = 'warm-up and check' if opts.refine else 'warm-up'
        raise UserError(f'--warmup_seed: {kind} seeds {warm.start}-{warm.stop - 1} overlap --seeds; '
                        'pick a --warmup_seed outside the sampled seeds')


def parse_save_num_steps(opts):
    """The num_steps a --dp run searches for: --save_num_steps, or --num_steps alone."""
    if not opts.save_num_steps:
        return [opts.num_steps]
    try:
        values = misc.parse_int_list(opts.save_num_steps)
    except ValueError as e:
        raise UserError(f'--save_num_steps: {e}') from None
    if min(values) < 2 or max(values) > opts.num_steps_tea:
        raise UserError(f'--save_num_steps: values must lie in 2..--num_steps_tea ({opts.num_steps_tea})')
    return values
