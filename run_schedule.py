"""Where a sample.py run gets its t_steps: an explicit --t_steps, a --schedule_file written by an
earlier search, a GITS search on warm-up seeds (--dp, with the options of student_search.py), or a
named schedule (--schedule_type). Also the schedule files. Every function reads the frozen
options.Options record of the run.
"""

import hashlib
import json
import os
import sys

import torch

import schedule_io
import schedules
import solvers
import student_search
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.seeds import seed_batch, split_batches

PIPELINE = 'pipeline'     # --schedule_type: a diffusers pipeline's own scheduler sigmas


def build_schedule(opts, model, device):
    """The t_steps of this run, and the search's record (None without a search)."""
    sigma_min = opts.sigma_min if opts.sigma_min is not None else model.sigma_min
    sigma_max = opts.sigma_max if opts.sigma_max is not None else model.sigma_max
    if opts.t_steps_list is not None:        # --t_steps, or the entry of a --schedule_file
        return torch.tensor(opts.t_steps_list, dtype=torch.float64), None
    if opts.dp:
        return search_for_sampling(model, opts, sigma_min, sigma_max, device)
    if opts.schedule_type == PIPELINE:
        return pipeline_model(opts, model).pipeline_sigmas(opts.num_steps), None
    try:
        t = schedules.get_schedule(opts.num_steps, sigma_min, sigma_max, opts.schedule_type,
                                      opts.schedule_rho, model=model, compat=opts.compat)
    except ValueError as e:
        raise UserError(str(e)) from None
    return t, None


def pipeline_model(opts, model):
    if not hasattr(model, 'pipeline_sigmas'):
        raise UserError(f'--schedule_type: {PIPELINE} is the scheduler of a diffusers pipeline (--dataset_name=diffusers); '
                        f'"{opts.dataset_name}" has none')
    return model


def start_scale(opts, model, t_steps):
    """The factor of the unit noise where sampling starts: t_steps[0], except in pipeline mode,
    which starts where the pipeline starts (its scheduler's init_noise_sigma: sqrt(sigma_0^2 + 1)
    with SD/SDXL's 'leading' spacing; the noise itself, x_t = noise, for flow models)."""
    if opts.schedule_type == PIPELINE and opts.t_steps_list is None and not opts.dp:
        return pipeline_model(opts, model).pipeline_noise_scale(opts.num_steps)
    return float(t_steps[0])


RANGE_TOLERANCE = 1e-6      # relative: a float32 copy of the model's own end points is inside


def warn_outside_model_range(t_steps, model):
    """One warning line (stderr, rank 0) where the schedule leaves the noise levels the model was
    trained on: a pasted list, a schedule file or a preset made for another model."""
    hi, lo = float(t_steps[0]), float(t_steps[-1])
    if hi > model.sigma_max * (1 + RANGE_TOLERANCE) or lo < model.sigma_min * (1 - RANGE_TOLERANCE):
        dist.print0(f'Warning: the schedule runs from sigma {hi:g} to {lo:g}, outside the model\'s range '
                    f'[{model.sigma_min:g}, {model.sigma_max:g}]; the model was not trained there', file=sys.stderr)


def expected_points(opts):
    """Length of the schedule before it is built: what a search returns (with afs ours inserts a
    free step; it can find no room for it, so the real length may be one less; the official's
    afs teacher (--compat) mostly leaves none, gits.py section 4)."""
    if opts.t_steps_list is not None:
        return len(opts.t_steps_list)
    return opts.num_steps + int(bool(opts.dp and opts.afs and opts.compat is None))


def schedule_tag(opts):
    """Where the schedule comes from, in a few characters: run.json's schedule_source and the
    suffix of the default folder name. A fixed type (with its rho unless it is the default 7;
    logsnr has none), 'gits' (+ '-student' or '-rotation', '-refined', '-learned', and the base type if
    not polynomial rho 7), 'tsteps-' + a hash of a pasted list, 'file-' + the schedule file's name."""
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
    tag = 'gits' + (f'-{opts.search}' if opts.search in ('student', 'rotation') else '') + ('-refined' if opts.refine else '') + \
        ('-learned' if getattr(opts, 'refine_coefficients', False) else '')
    return tag if base == 'polynomial' else f'{tag}-{base}'


# ----------------------------------------------------------------------------------------------
# Flag groups (options.RULES says which apply to which run; schedule files record SEARCH_FLAGS).

DEFAULT_RHO = 7.0
SCHEDULE_FLAGS = ('num_steps', 'schedule_type', 'schedule_rho', 'sigma_min', 'sigma_max')
SEARCH_FLAGS = ('metric', 'coeff', 'num_warmup', 'solver_tea', 'num_steps_tea', 'warmup_seed', 'search', 'refine',
                'refine_budget', 'refine_coefficients')   # how a schedule was searched: schedule files record them
SAVE_FLAGS = ('save_schedules', 'save_num_steps')
SAMPLING_FLAGS = ('seeds', 'outdir', 'grid', 'subdirs', 'denoise_to_zero')


# ----------------------------------------------------------------------------------------------
# GITS search for sampling.

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
    if not opts.refine:
        return []
    return warmup_rounds(model, opts, device, skip=opts.num_warmup,
                         count=opts.num_warmup * student_search.CHECK_PER_WARMUP)


STAGE_NAMES = dict(teacher='teacher', cost='cost matrix', dp='DP', afs='afs free step', student='solver-aware DP',
                   check='check-set teacher', refine='refinement', rotation='equal-rotation cut points',
                   cost_helper='cost matrix on a helper thread (beside the teacher, but the last round)')


def counting(denoise, bar):
    """`denoise` counting the batch rows it evaluates into the progress `bar` (tqdm); past the
    bar's total (if any) it counts on without one."""
    def fn(x, sigma, *args, **kwargs):
        out = denoise(x, sigma, *args, **kwargs)
        if bar.total is not None and bar.n + len(x) > bar.total:
            bar.total = None        # e.g. past a search's teacher runs: free step, solver-aware DP, refinement
        bar.update(len(x))
        return out
    return fn


def counted(rounds, bar):
    """Warm-up `rounds` whose denoisers count into `bar`."""
    return [(first, counting(denoise, bar), noise) for first, denoise, noise in rounds]


def progress(total, desc):
    """A progress bar of denoiser evaluations (batch rows), shown by rank 0 only. On stdout, like
    sampling's and fid.py's: stderr holds nothing but an error's one line, also when the error is
    found in the middle of a search (e.g. a refinement budget too small for its check set)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='eval', file=sys.stdout, disable=dist.get_rank() != 0)


def search_progress(opts, rounds):
    """The search's progress over this rank's denoiser evaluations: its total is the teacher
    runs' (the bulk of a search); beyond it the bar counts on."""
    rows = sum(len(noise) for _, _, noise in rounds)
    return progress(rows * solvers.count_nfe(opts.solver_tea, opts.num_steps_tea, compat=opts.compat,
                                             **opts.teacher_options), 'GITS search')


def search_for_sampling(model, opts, sigma_min, sigma_max, device):
    """Run the search for sample.py; with --save_schedules, write every requested num_steps."""
    all_steps = opts.save_num_steps_list if opts.save_schedules else [opts.num_steps]
    rounds, checks = warmup_rounds(model, opts, device), check_rounds(model, opts, device)
    try:
        with search_progress(opts, rounds + checks) as bar:
            found, info = student_search.search_rounds(
                counted(rounds, bar), check_rounds=counted(checks, bar),
                num_steps=opts.num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                schedule_type=opts.schedule_type, schedule_rho=opts.schedule_rho, solver_tea=opts.solver_tea,
                num_steps_tea=opts.num_steps_tea, metric=opts.metric, coeff=opts.coeff, afs=bool(opts.afs),
                solver=opts.solver, model=model, all_num_steps=all_steps, search=opts.search or 'gits',
                refine=bool(opts.refine), refine_budget=opts.refine_budget,
                refine_coefficients=bool(opts.refine_coefficients), compat=opts.compat, denoise_to_zero=bool(opts.denoise_to_zero), **opts.solver_flags)
    except ValueError as e:
        raise UserError(str(e)) from None
    teacher_text = ', '.join(f'{k}={v}' for k, v in info['teacher_options'].items()) or 'no options'
    dist.print0(f'GITS teacher: {opts.solver_tea} ({teacher_text}' + (', afs' if info.get('teacher_afs') else '') + ')')
    dist.print0('GITS search: ' + ', '.join(f'{v:.2f}s {STAGE_NAMES[k]}' for k, v in info['seconds'].items()))
    dist.print0('Search evaluations: ' + ', '.join(f'{v} {STAGE_NAMES[k]}' for k, v in info['evals'].items()))
    for n, r in sorted(info.get('refined', {}).items(), key=lambda kv: int(kv[0])):
        dist.print0(refinement_line(n, r))
    if opts.save_schedules:
        dist.on_rank0(lambda: save_schedules(opts.save_schedules, found, opts, info, sigma_min, sigma_max, model))
        info['saved_num_steps'] = sorted(found)
    return found[opts.num_steps] if opts.num_steps in found else None, info


def searched_coefficients(info, num_steps):
    """The learned coefficients a search (--refine_coefficients) kept for num_steps, or None."""
    return ((info or {}).get('refined') or {}).get(str(num_steps), {}).get('coefficients')


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
    if 'coefficients' in r:          # kept can be the points alone, the learned weights rejected
        verdict += (f' (with learned coefficients, {r["objective"]} objective, {r["stage"]})' if r['coefficients'] is not None
                    else ' (with the analytic coefficients)')
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
        solver_options=opts.solver_options, afs=bool(opts.afs), compat=opts.compat,
        teacher_options=info['teacher_options'], schedule_type=opts.schedule_type,
        schedule_rho=opts.schedule_rho, sigma_min=float(sigma_min), sigma_max=float(sigma_max), metric=opts.metric,
        coeff=opts.coeff, solver_tea=opts.solver_tea, num_steps_tea=opts.num_steps_tea, num_warmup=opts.num_warmup,
        warmup_seed=opts.warmup_seed, search=info['search'], refine=info['refine'],
        refine_budget=info.get('refine_budget'),    # the search's own, default resolved
        guidance_type=opts.guidance_type, guidance_rate=opts.guidance_rate, class_idx=opts.class_idx,   # provenance
        schedules={str(n): [float(t) for t in ts] for n, ts in sorted(found.items())},
        t_steps_text={str(n): schedules.format_t_steps(ts) for n, ts in sorted(found.items())},
        exports={str(n): schedule_io.exports(ts, model) for n, ts in sorted(found.items())},
        seconds=info['seconds'])
    if opts.refine_coefficients:      # only then: a file without learned coefficients keeps its bytes
        record.update(refine_coefficients=True, coefficients={str(n): searched_coefficients(info, n) for n in sorted(found)})
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


def schedule_from_file(opts, solver_options):
    """The schedule (a list) for opts.num_steps from the --schedule_file, and its learned
    coefficients (None: the analytic ones), after checking that the file was searched for this
    run: same model, solver, solver options (`solver_options`, resolved) and afs, and the same value
    of every schedule or search flag the run names (opts.given); learned coefficients must have
    the shape of the solver's table on that schedule."""
    path = opts.schedule_file
    record = read_schedule_file(path)
    this = dict(dataset_name=opts.dataset_name, solver=opts.solver, afs=bool(opts.afs), compat=opts.compat,
                **solver_options)
    recorded = dict(record, **(record.get('solver_options') or {}))
    recorded.setdefault('afs', False)
    recorded.setdefault('compat', None)      # files written before --compat existed
    recorded.setdefault('refine_coefficients', False)
    for key, value in this.items():
        if key in recorded and recorded[key] != value:
            fix = f'pass --{key}={recorded[key]}' if recorded[key] is not None else f'drop --{key}'
            raise UserError(f'--{key}: "{path}" was searched with {key}={recorded[key]}, this run has {value}; '
                            f'{fix} or search again')
    for flag in SCHEDULE_FLAGS[1:] + SEARCH_FLAGS:
        if flag not in opts.given:
            continue
        if flag not in recorded:
            raise UserError(f'--{flag}: "{path}" does not record {flag}; drop the flag')
        if recorded[flag] != getattr(opts, flag):
            raise UserError(f'--{flag}: "{path}" was searched with {flag}={recorded[flag]}, not {getattr(opts, flag)}')
    key = str(opts.num_steps)
    if key not in record['schedules']:
        raise UserError(f'--num_steps: "{path}" holds schedules for num_steps '
                        f'{", ".join(sorted(record["schedules"], key=int))}')
    try:
        t_steps = schedules.check_t_steps(record['schedules'][key])
        coefficients = (record.get('coefficients') or {}).get(key)
        if coefficients is not None:
            coefficients = checked_coefficients(opts.solver, t_steps, solver_options, coefficients, bool(opts.afs))
    except (ValueError, TypeError) as e:
        raise UserError(f'--schedule_file: "{path}": {e}') from None
    return t_steps, coefficients


def checked_coefficients(solver, t_steps, solver_options, coefficients, afs=False):
    """`coefficients` if they fit the solver's table on t_steps, with or without afs (ValueError in
    one line if not)."""
    if solver not in solvers.MULTISTEP:
        raise ValueError(f'learned coefficients are for a multistep solver ({", ".join(solvers.MULTISTEP)}), '
                         f'not {solver}')
    if not isinstance(coefficients, dict):
        raise ValueError('coefficients: not a table')
    _, table, corrector = solvers.multistep_tables(solver, t_steps, **solver_options)
    solvers.with_coefficients(table, corrector, coefficients, float(t_steps[0]) if afs else None)
    return coefficients
