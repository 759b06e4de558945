"""Where a sample.py run gets its t_steps: an explicit --t_steps, a --schedule_file written by an
earlier search, a GITS search on warm-up seeds (--dp, with the options of student_search.py), or a
named schedule (--schedule_type). Also the GITS flag checks and the schedule files.
"""

import json
import math

import torch

import gits
import schedule_io
import solver_utils
import student_search
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.seeds import seed_batch, split_batches

def build_schedule(opts, model, device):
    """The t_steps of this run, and the search's record (None without a search)."""
    sigma_min = opts.sigma_min if opts.sigma_min is not None else model.sigma_min
    sigma_max = opts.sigma_max if opts.sigma_max is not None else model.sigma_max
    if opts.t_steps is not None:
        return torch.tensor(opts.t_steps_list, dtype=torch.float64), None
    if opts.schedule_file is not None:
        return schedule_from_file(opts.schedule_file, opts), None
    if opts.dp:
        return search_for_sampling(model, opts, sigma_min, sigma_max, device)
    try:
        t = solver_utils.get_schedule(opts.num_steps, sigma_min, sigma_max, opts.schedule_type,
                                      opts.schedule_rho, model=model)
    except ValueError as e:
        raise UserError(str(e)) from None
    return t, None


# ----------------------------------------------------------------------------------------------
# GITS search for sampling.

def validate_options(opts):
    """Checks of the GITS flags that need no model; UserError with one line naming the flag."""
    for flag in ('search', 'refine', 'refine_budget'):
        if not opts.dp and opts.get(flag) not in (None, False):
            raise UserError(f'--{flag}: needs --dp=True (it changes how the schedule is searched)')
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
    warm = range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup)
    if any(s in warm for s in opts.seed_list):
        raise UserError(f'--warmup_seed: warm-up seeds {warm.start}-{warm.stop - 1} overlap --seeds; '
                        'pick a --warmup_seed outside the sampled seeds')
    opts.save_num_steps_list = [opts.num_steps]
    if opts.save_num_steps:
        try:
            opts.save_num_steps_list = misc.parse_int_list(opts.save_num_steps)
        except ValueError as e:
            raise UserError(f'--save_num_steps: {e}') from None
        if min(opts.save_num_steps_list) < 2 or max(opts.save_num_steps_list) > opts.num_steps_tea:
            raise UserError(f'--save_num_steps: values must lie in 2..--num_steps_tea ({opts.num_steps_tea})')


def warmup_rounds(model, opts, device):
    """This rank's warm-up rounds: seeds warmup_seed + i, split across ranks like sampling."""
    seeds = list(range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup))
    rank, world = dist.get_rank(), dist.get_world_size()
    rounds = []
    for batch in split_batches(seeds, opts.batch, world)[rank::world]:
        if batch:
            noise, denoise = seed_batch(model, batch, device, class_idx=opts.class_idx, warmup=True)
            rounds.append((batch[0] - opts.warmup_seed, denoise, noise))
    return rounds


STAGE_NAMES = dict(teacher='teacher', cost='cost matrix', dp='DP', afs='afs free step', student='solver-aware DP',
                   refine='refinement')


def search_for_sampling(model, opts, sigma_min, sigma_max, device):
    """Run the search for sample.py; with --save_schedules, write every requested num_steps."""
    all_steps = opts.save_num_steps_list if opts.save_schedules else [opts.num_steps]
    try:
        schedules, info = student_search.search_rounds(
            warmup_rounds(model, opts, device), num_steps=opts.num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
            schedule_type=opts.schedule_type, schedule_rho=opts.schedule_rho, solver_tea=opts.solver_tea,
            num_steps_tea=opts.num_steps_tea, metric=opts.metric, coeff=opts.coeff, afs=bool(opts.afs),
            solver=opts.solver, model=model, all_num_steps=all_steps, search=opts.get('search') or 'gits',
            refine=bool(opts.get('refine')), refine_budget=opts.get('refine_budget') or 4.0,
            **opts.solver_options)
    except ValueError as e:
        raise UserError(str(e)) from None
    dist.print0('GITS search: ' + ', '.join(f'{v:.2f}s {STAGE_NAMES[k]}' for k, v in info['seconds'].items()))
    dist.print0('Search evaluations: ' + ', '.join(f'{v} {STAGE_NAMES[k]}' for k, v in info['evals'].items()))
    if opts.save_schedules:
        if dist.get_rank() == 0:
            save_schedules(opts.save_schedules, schedules, opts, info, model)
        info['saved_num_steps'] = sorted(schedules)
        dist.barrier()
    return schedules[opts.num_steps] if opts.num_steps in schedules else None, info


def save_schedules(path, schedules, opts, info, model=None):
    """The searched schedules, with each one also in diffusers' and ComfyUI's forms (schedule_io)."""
    record = dict(
        format='gits-schedules-v1', dataset_name=opts.dataset_name, solver=opts.solver, afs=bool(opts.afs),
        schedule_type=opts.schedule_type, schedule_rho=opts.schedule_rho, metric=opts.metric, coeff=opts.coeff,
        solver_tea=opts.solver_tea, num_steps_tea=opts.num_steps_tea, num_warmup=opts.num_warmup,
        warmup_seed=opts.warmup_seed, search=info['search'], refine=info['refine'],
        schedules={str(n): [float(t) for t in ts] for n, ts in sorted(schedules.items())},
        t_steps_text={str(n): solver_utils.format_t_steps(ts) for n, ts in sorted(schedules.items())},
        exports={str(n): schedule_io.exports(ts, model) for n, ts in sorted(schedules.items())},
        seconds=info['seconds'])
    try:
        misc.atomic_write_json(path, record)
    except OSError as e:
        raise UserError(f'--save_schedules: cannot write "{path}": {e.strerror}') from None


def schedule_from_file(path, opts):
    """The schedule for opts.num_steps from a --save_schedules file."""
    try:
        with open(path) as f:
            record = json.load(f)
        table = record['schedules']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'--schedule_file: cannot read a schedule file from "{path}" ({e})') from None
    key = str(opts.num_steps)
    if key not in table:
        raise UserError(f'--num_steps: {path} holds schedules for num_steps {", ".join(sorted(table, key=int))}')
    if bool(record.get('afs', False)) != bool(opts.afs):
        raise UserError(f'--afs: {path} was searched with afs={record.get("afs")}; pass the same --afs')
    try:
        values = solver_utils.check_t_steps(table[key])
    except ValueError as e:
        raise UserError(f'--schedule_file: {e}') from None
    return torch.tensor(values, dtype=torch.float64)
