"""Where a sample.py run gets its t_steps: an explicit --t_steps, a --schedule_file written by an
earlier search, a GITS search on warm-up seeds (--dp, with the options of student_search.py), or a
named schedule (--schedule_type). Also the GITS flag checks and the schedule files.
"""

import hashlib
import json
import math
import os

import torch

import dnnlib
import gits
import schedule_io
import schedules
import student_search
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.seeds import seed_batch, split_batches

def build_schedule(opts, model, device):
    """The t_steps of this run, and the search's record (None without a search)."""
    sigma_min = opts.sigma_min if opts.sigma_min is not None else model.sigma_min
    sigma_max = opts.sigma_max if opts.sigma_max is not None else model.sigma_max
    if opts.t_steps_list is not None:        # --t_steps, or the entry of a --schedule_file
        return torch.tensor(opts.t_steps_list, dtype=torch.float64), None
    if opts.dp:
        return search_for_sampling(model, opts, sigma_min, sigma_max, device)
    try:
        t = schedules.get_schedule(opts.num_steps, sigma_min, sigma_max, opts.schedule_type,
                                      opts.schedule_rho, model=model, compat=opts.get('compat'))
    except ValueError as e:
        raise UserError(str(e)) from None
    return t, None


def expected_points(opts):
    """Length of the schedule before it is built: what a search returns (with afs ours inserts a
    free step; it can find no room for it, so the real length may be one less; the official's
    afs teacher (--compat) mostly leaves none, gits.py section 4)."""
    if opts.t_steps_list is not None:
        return len(opts.t_steps_list)
    return opts.num_steps + int(bool(opts.dp and opts.afs and opts.get('compat') is None))


def schedule_tag(opts):
    """Where the schedule comes from, in a few characters: run.json's schedule_source and the
    suffix of the default folder name. A fixed type (with its rho unless it is the default 7;
    logsnr has none), 'gits' (+ '-student', '-refined', and the base type if not polynomial
    rho 7), 'tsteps-' + a hash of a pasted list, 'file-' + the schedule file's name."""
    if opts.t_steps is not None:
        text = schedules.format_t_steps(opts.t_steps_list)
        return 'tsteps-' + hashlib.sha1(text.encode()).hexdigest()[:8]
    if opts.schedule_file is not None:
        return 'file-' + os.path.splitext(os.path.basename(opts.schedule_file))[0]
    base = opts.schedule_type
    if opts.schedule_type != 'logsnr' and opts.schedule_rho != DEFAULT_RHO:
        base += f'-rho{opts.schedule_rho:g}'
    if not opts.dp:
        return base
    tag = 'gits' + ('-student' if opts.get('search') == 'student' else '') + ('-refined' if opts.get('refine') else '')
    return tag if base == 'polynomial' else f'{tag}-{base}'


# ----------------------------------------------------------------------------------------------
# Which flags apply. A flag given where it does not apply is refused in one line that names it and
# what it needs, never ignored. `given`: the options named on the command line (not defaults).

DEFAULT_RHO = 7.0
SCHEDULE_FLAGS = ('num_steps', 'schedule_type', 'schedule_rho', 'sigma_min', 'sigma_max')
SEARCH_FLAGS = ('metric', 'coeff', 'num_warmup', 'solver_tea', 'num_steps_tea', 'warmup_seed', 'search', 'refine',
                'refine_budget')                  # how a schedule was searched: schedule files record them
SAVE_FLAGS = ('save_schedules', 'save_num_steps')
SAMPLING_FLAGS = ('seeds', 'outdir', 'grid', 'subdirs', 'denoise_to_zero')

SCHEDULE_RULES = (   # (flags, does it apply to this run?, what they need); also trajectory.py's
    (SCHEDULE_FLAGS, lambda o: o.t_steps is None,
     'does not apply with --t_steps (the pasted list is the whole schedule)'),
    (('schedule_rho',), lambda o: o.schedule_type != 'logsnr',
     'does not apply to --schedule_type=logsnr (it has no exponent)'),
)
RULES = SCHEDULE_RULES + (
    (SEARCH_FLAGS, lambda o: o.dp or o.schedule_file is not None,
     'needs --dp=True (it is an option of the GITS search)'),
    (SAVE_FLAGS, lambda o: o.dp,
     'needs --dp=True (it saves searched schedules)'),
    (('refine_budget',), lambda o: bool(o.refine) or not o.dp,
     'needs --refine=True'),
    (('save_num_steps',), lambda o: o.save_schedules is not None,
     'needs --save_schedules=FILE'),
    (SAMPLING_FLAGS, lambda o: o.save_schedules is None,
     'does not apply with --save_schedules (that run searches, saves the schedules and exits)'),
    (('sigma_min', 'sigma_max'), lambda o: o.get('compat') is None,
     'the official gits-main ignores it (it always takes the model\'s own range), so --compat=gits-main does not '
     'take it'),
    (('search',), lambda o: o.get('compat') is None or o.search in (None, 'gits'),
     'the solver-aware search is not in the paper\'s code; --compat=gits-main runs the paper\'s search only'),
    (('refine',), lambda o: o.get('compat') is None or not o.refine,
     'refinement is not in the paper\'s code; --compat=gits-main runs the paper\'s search only'),
)


def check_flags(opts, given):
    """Refuse flags that do not apply; check the GITS values (--dp) and read the schedule file
    (--schedule_file), all before any model loads. Sets opts.t_steps_list for a schedule file and
    opts.save_num_steps_list for --save_schedules."""
    dnnlib.util.refuse_inapplicable(opts, given, RULES)
    if opts.dp:
        validate_options(opts)
    if opts.save_schedules is not None:
        dnnlib.util.check_writable_file(opts.save_schedules, '--save_schedules')
    if opts.schedule_file is not None:
        opts.t_steps_list = schedule_from_file(opts, given)


# ----------------------------------------------------------------------------------------------
# GITS search for sampling.

def validate_options(opts):
    """Checks of the GITS values that need no model; UserError with one line naming the flag."""
    if opts.coeff is None or not opts.coeff > 0:
        raise UserError(f'--coeff: must be positive (got {opts.coeff})')
    if opts.num_warmup is None or opts.num_warmup < 1:
        raise UserError(f'--num_warmup: must be at least 1 (got {opts.num_warmup})')
    if opts.num_steps_tea < opts.num_steps:
        raise UserError(f'--num_steps_tea: must be at least --num_steps ({opts.num_steps}); got {opts.num_steps_tea}')
    if opts.metric not in gits.METRICS:
        raise UserError(f'--metric: must be one of {", ".join(gits.METRICS)}')
    if opts.get('search') is not None and opts.search not in student_search.SEARCH_MODES:
        raise UserError(f'--search: must be one of {", ".join(student_search.SEARCH_MODES)} (got "{opts.search}")')
    budget = opts.get('refine_budget')
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UserError(f'--refine_budget: must be a positive multiple of the teacher\'s evaluations (got {budget})')
    drawn = opts.num_warmup * (1 + (student_search.CHECK_PER_WARMUP if opts.get('refine') else 0))
    warm = range(opts.warmup_seed, opts.warmup_seed + drawn)        # with --refine, also its check seeds
    if opts.save_schedules is None and any(s in warm for s in opts.seed_list):
        kind = 'warm-up and check' if opts.get('refine') else 'warm-up'
        raise UserError(f'--warmup_seed: {kind} seeds {warm.start}-{warm.stop - 1} overlap --seeds; '
                        'pick a --warmup_seed outside the sampled seeds')
    opts.save_num_steps_list = [opts.num_steps]
    if opts.save_num_steps:
        try:
            opts.save_num_steps_list = misc.parse_int_list(opts.save_num_steps)
        except ValueError as e:
            raise UserError(f'--save_num_steps: {e}') from None
        if min(opts.save_num_steps_list) < 2 or max(opts.save_num_steps_list) > opts.num_steps_tea:
            raise UserError(f'--save_num_steps: values must lie in 2..--num_steps_tea ({opts.num_steps_tea})')


def warmup_rounds(model, opts, device, skip=0, count=None):
    """This rank's warm-up rounds: seeds warmup_seed + skip + i for i < count (default
    num_warmup), split across ranks like sampling, indexed from 0. The refinement's check set is
    the num_warmup * CHECK_PER_WARMUP seeds after the warm-up ones."""
    base = opts.warmup_seed + skip
    seeds = list(range(base, base + (opts.num_warmup if count is None else count)))
    rank, world = dist.get_rank(), dist.get_world_size()
    rounds = []
    for batch in split_batches(seeds, opts.batch, world)[rank::world]:
        if batch:
            noise, denoise = seed_batch(model, batch, device, class_idx=opts.class_idx, warmup=True)
            rounds.append((batch[0] - base, denoise, noise))
    return rounds


def check_rounds(model, opts, device):
    """This rank's rounds of the refinement's check set (none without --refine)."""
    if not opts.get('refine'):
        return []
    return warmup_rounds(model, opts, device, skip=opts.num_warmup,
                         count=opts.num_warmup * student_search.CHECK_PER_WARMUP)


STAGE_NAMES = dict(teacher='teacher', cost='cost matrix', dp='DP', afs='afs free step', student='solver-aware DP',
                   check='check-set teacher', refine='refinement',
                   cost_helper='cost matrix on a helper thread (beside the teacher, but the last round)')


def search_for_sampling(model, opts, sigma_min, sigma_max, device):
    """Run the search for sample.py; with --save_schedules, write every requested num_steps."""
    all_steps = opts.save_num_steps_list if opts.save_schedules else [opts.num_steps]
    try:
        schedules, info = student_search.search_rounds(
            warmup_rounds(model, opts, device), check_rounds=check_rounds(model, opts, device),
            num_steps=opts.num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
            schedule_type=opts.schedule_type, schedule_rho=opts.schedule_rho, solver_tea=opts.solver_tea,
            num_steps_tea=opts.num_steps_tea, metric=opts.metric, coeff=opts.coeff, afs=bool(opts.afs),
            solver=opts.solver, model=model, all_num_steps=all_steps, search=opts.get('search') or 'gits',
            refine=bool(opts.get('refine')), refine_budget=opts.get('refine_budget') or student_search.REFINE_BUDGET,
            compat=opts.get('compat'), denoise_to_zero=bool(opts.denoise_to_zero), **opts.solver_flags)
    except ValueError as e:
        raise UserError(str(e)) from None
    teacher_text = ', '.join(f'{k}={v}' for k, v in info['teacher_options'].items()) or 'no options'
    dist.print0(f'GITS teacher: {opts.solver_tea} ({teacher_text}' + (', afs' if info.get('teacher_afs') else '') + ')')
    dist.print0('GITS search: ' + ', '.join(f'{v:.2f}s {STAGE_NAMES[k]}' for k, v in info['seconds'].items()))
    dist.print0('Search evaluations: ' + ', '.join(f'{v} {STAGE_NAMES[k]}' for k, v in info['evals'].items()))
    for n, r in sorted(info.get('refined', {}).items(), key=lambda kv: int(kv[0])):
        dist.print0(refinement_line(n, r))
    if opts.save_schedules:
        dist.on_rank0(lambda: save_schedules(opts.save_schedules, schedules, opts, info, sigma_min, sigma_max, model))
        info['saved_num_steps'] = sorted(schedules)
    return schedules[opts.num_steps] if opts.num_steps in schedules else None, info


def refinement_line(num_steps, r):
    """What the refinement did for one num_steps, in one line."""
    finals = r.get('finalists') or {}
    where, value = ('warm-up + check', finals[r['start']]) if r['start'] in finals else \
        ('warm-up', r['start_objectives'][r['start']])
    head = (f'Refinement, num_steps {num_steps}: start {r["start"]} ({where} RMSE {value:.4g}, '
            f'best of {len(r["start_objectives"])} starts)')
    spent = f'{r["evals"]} of {r["budget"]} evaluations' if r['budget'] is not None else f'{r["evals"]} evaluations'
    if not r['steps']:
        return f'{head}, no step lowered the fit objective: start kept; {spent}'
    c = r['check']
    verdict = 'kept' if r['kept'] else 'rejected (gain within one SE), start kept'
    return (f'{head}, {r["steps"]} steps, fit {r["trace"][0][0]:.4g} -> {r["trace"][-1][1]:.4g} on {r["fit"]}, '
            f'check {c["start"]:.4g} -> {c["refined"]:.4g} on {c["size"]} (gain {c["gain"]:.2g} +- {c["se"]:.2g} SE): '
            f'{verdict}; {spent}')


# ----------------------------------------------------------------------------------------------
# Schedule files. A file records what its schedules are for (model, solver and options, afs) and
# how they were searched; sampling from it refuses a run that differs in the former, or in any of
# the latter that the run names.

FILE_FORMAT = 'gits-schedules-v1'


def save_schedules(path, found, opts, info, sigma_min, sigma_max, model=None):
    """The searched schedules, with each one also in diffusers' and ComfyUI's forms (schedule_io)."""
    record = dict(
        format=FILE_FORMAT, dataset_name=opts.dataset_name, solver=opts.solver,
        solver_options=opts.solver_options, afs=bool(opts.afs), compat=opts.get('compat'),
        teacher_options=info['teacher_options'], schedule_type=opts.schedule_type,
        schedule_rho=opts.schedule_rho, sigma_min=float(sigma_min), sigma_max=float(sigma_max), metric=opts.metric,
        coeff=opts.coeff, solver_tea=opts.solver_tea, num_steps_tea=opts.num_steps_tea, num_warmup=opts.num_warmup,
        warmup_seed=opts.warmup_seed, search=info['search'], refine=info['refine'],
        refine_budget=(opts.get('refine_budget') or student_search.REFINE_BUDGET) if info['refine'] else None,
        guidance_type=opts.guidance_type, guidance_rate=opts.guidance_rate, class_idx=opts.class_idx,   # provenance
        schedules={str(n): [float(t) for t in ts] for n, ts in sorted(found.items())},
        t_steps_text={str(n): schedules.format_t_steps(ts) for n, ts in sorted(found.items())},
        exports={str(n): schedule_io.exports(ts, model) for n, ts in sorted(found.items())},
        seconds=info['seconds'])
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        misc.atomic_write_json(path, record)
    except OSError as e:
        raise UserError(f'--save_schedules: cannot write "{path}": {e.strerror}') from None


def read_schedule_file(path):
    """The record of a --save_schedules file; UserError in one line for anything else."""
    try:
        with open(path) as f:
            record = json.load(f)
    except OSError as e:
        raise UserError(f'--schedule_file: cannot read "{path}" ({e.strerror})') from None
    except ValueError as e:
        raise UserError(f'--schedule_file: "{path}" is not JSON ({e})') from None
    table = record.get('schedules') if isinstance(record, dict) else None
    if not isinstance(table, dict) or not table:
        raise UserError(f'--schedule_file: "{path}" is not a schedule file (it has no "schedules" table); '
                        'write one with --dp=True --save_schedules=FILE')
    return record


def schedule_from_file(opts, given):
    """The schedule (a list) for opts.num_steps from the --schedule_file, after checking that the
    file was searched for this run: same model, solver, solver options and afs, and the same
    value of every schedule or search flag the run names."""
    path = opts.schedule_file
    record = read_schedule_file(path)
    this = dict(dataset_name=opts.dataset_name, solver=opts.solver, afs=bool(opts.afs), compat=opts.get('compat'),
                **opts.solver_options)
    recorded = dict(record, **(record.get('solver_options') or {}))
    recorded.setdefault('afs', False)
    recorded.setdefault('compat', None)      # files written before --compat existed
    for key, value in this.items():
        if key in recorded and recorded[key] != value:
            fix = f'pass --{key}={recorded[key]}' if recorded[key] is not None else f'drop --{key}'
            raise UserError(f'--{key}: "{path}" was searched with {key}={recorded[key]}, this run has {value}; '
                            f'{fix} or search again')
    for flag in SCHEDULE_FLAGS[1:] + SEARCH_FLAGS:
        if flag not in given:
            continue
        if flag not in recorded:
            raise UserError(f'--{flag}: "{path}" does not record {flag}; drop the flag')
        if recorded[flag] != opts[flag]:
            raise UserError(f'--{flag}: "{path}" was searched with {flag}={recorded[flag]}, not {opts[flag]}')
    key = str(opts.num_steps)
    if key not in record['schedules']:
        raise UserError(f'--num_steps: "{path}" holds schedules for num_steps '
                        f'{", ".join(sorted(record["schedules"], key=int))}')
    try:
        return schedules.check_t_steps(record['schedules'][key])
    except (ValueError, TypeError) as e:
        raise UserError(f'--schedule_file: {e}') from None
