"""GITS: geometry-inspired time scheduling (Chen et al., ICML 2024, arXiv:2405.11326).

Sampling trajectories of the probability-flow ODE share a strong shape regularity, so a schedule
fitted on a few warm-up trajectories serves all samples. The search:

1. runs a fine teacher solver on warm-up noise over `num_steps_tea` points of the student's
   schedule type, keeping every point x_i and its raw slope d_i = (x_i - D(x_i; t_i)) / t_i;
2. prices every coarse step i -> j by one Euler step from the teacher point,
   xhat = x_i + (t_j - t_i) d_i, against the teacher point x_j (`cost_matrix`);
3. picks the cheapest path of K = num_steps - 1 steps by dynamic programming (`dp`); one cost
   matrix gives the best path for every K (`dp_all`);
4. with afs, tries each teacher point strictly between the first two chosen ones as a free extra
   step and keeps the one whose student output is closest to the teacher's.

Everything is per trajectory in float64 and reduced in warm-up-index order, so the schedule is
the same bit for bit whatever the batch size or number of processes.
"""

import json
import math
import time

import torch

import solver_utils
import solvers
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc

METRICS = ('dev', 'l1', 'l2')


# ----------------------------------------------------------------------------------------------
# 1. Teacher trajectories.

class _RecordingDenoiser:
    """Wraps a denoiser and remembers the last call at each noise level, so the teacher's own
    evaluations at its grid points give the slopes without extra network calls."""

    def __init__(self, denoise):
        self.denoise = denoise
        self.calls = {}
        self.count = 0

    def __call__(self, x, sigma):
        out = self.denoise(x, sigma)
        self.calls[float(sigma)] = (x, out)
        self.count += 1
        return out


def teacher_trajectory(denoise, latents, t_tea, solver_tea='ipndm', **options):
    """Teacher points xs [N, B, ...] and raw slopes ds [N-1, B, ...] (no slope is needed at the
    last point). `latents` are standard normal; the teacher starts at latents * t_tea[0]."""
    rec = _RecordingDenoiser(denoise)
    x0 = latents * float(t_tea[0])
    _, xs = solvers.SOLVERS[solver_tea](rec, x0, t_tea, return_inters=True, **options)
    ds = []
    for i, t in enumerate(t_tea[:-1]):
        hit = rec.calls.get(float(t))
        if hit is not None and hit[0].shape == xs[i].shape and torch.equal(hit[0], xs[i]):
            d_out = hit[1]
        else:   # the solver evaluated elsewhere (e.g. UniPC's corrector moved the point)
            d_out = denoise(xs[i], float(t))
        ds.append((xs[i] - d_out) / float(t))
    return xs, torch.stack(ds), rec.count


# ----------------------------------------------------------------------------------------------
# 2. Cost matrix.

def _line_distance(points, start, direction):
    """Distance of each point [..., B, D] from the line start + s * direction ([B, D], unit)."""
    rel = points - start
    along = (rel * direction).sum(-1, keepdim=True)
    return (rel - along * direction).square().sum(-1).clamp_min(0).sqrt()


def trajectory_costs(xs, ds, t_tea, metric='dev'):
    """Per-trajectory cost matrices [B, N, N] (float64; +inf where i >= j)."""
    if metric not in METRICS:
        raise ValueError(f'--metric: unknown metric "{metric}"; choose one of {", ".join(METRICS)}')
    n, b = xs.shape[0], xs.shape[1]
    xs = xs.reshape(n, b, -1).to(torch.float64)
    ds = ds.reshape(n - 1, b, -1).to(torch.float64)
    ts = torch.as_tensor([float(t) for t in t_tea], dtype=torch.float64, device=xs.device)
    cost = torch.full([b, n, n], math.inf, dtype=torch.float64)
    if metric == 'dev':
        start = xs[0]
        direction = xs[-1] - xs[0]
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        dev_teacher = _line_distance(xs, start, direction)                 # [N, B]
        dev_teacher[-1] = 0        # the last point lies on the line by construction
    for i in range(n - 1):
        steps = (ts[i + 1:] - ts[i]).view(-1, 1, 1)
        xhat = xs[i][None] + steps * ds[i][None]                          # [N-i-1, B, D]
        if metric == 'dev':
            c = _line_distance(xhat, start, direction) - dev_teacher[i + 1:]
        elif metric == 'l2':
            c = (xhat - xs[i + 1:]).square().sum(-1).sqrt()
        else:
            c = (xhat - xs[i + 1:]).abs().sum(-1)
        cost[:, i, i + 1:] = c.T.cpu()
    return cost


# ----------------------------------------------------------------------------------------------
# 3. Dynamic programming.

def dp_all(cost, coeff=1.15, max_steps=None):
    """Best paths from index 0 to N-1 for every number of steps K = 1..max_steps.

    Path cost = sum_k coeff^k * C[p_k, p_k+1] (the recursion V[i][k] = min_m C[i][m] +
    coeff * V[m][k-1], V[i][1] = C[i][N-1]). Returns {K: [0, p_1, ..., N-1]}."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    n = cost.shape[0]
    max_steps = n - 1 if max_steps is None else min(int(max_steps), n - 1)
    inf = math.inf
    value = [[inf] * (max_steps + 1) for _ in range(n)]
    choice = [[-1] * (max_steps + 1) for _ in range(n)]
    c = cost.tolist()
    for i in range(n - 1):
        value[i][1] = c[i][n - 1]
        choice[i][1] = n - 1
    for k in range(2, max_steps + 1):
        for i in range(n - 1):
            best, arg = inf, -1
            for m in range(i + 1, n - 1):
                v = c[i][m] + coeff * value[m][k - 1]
                if v < best:
                    best, arg = v, m
            value[i][k], choice[i][k] = best, arg
    paths = {}
    for k in range(1, max_steps + 1):
        if choice[0][k] < 0:
            continue
        path, i = [0], 0
        for kk in range(k, 0, -1):
            i = choice[i][kk]
            path.append(i)
        paths[k] = path
    return paths


def dp(cost, num_steps, coeff=1.15):
    """Indices (into the teacher grid) of the best `num_steps`-point schedule."""
    k = int(num_steps) - 1
    paths = dp_all(cost, coeff, k)
    if k not in paths:
        raise ValueError(f'--num_steps: {num_steps} points do not fit a teacher grid of {len(cost)}')
    return paths[k]


def path_cost(cost, path, coeff):
    return sum(coeff ** k * float(cost[a][b]) for k, (a, b) in enumerate(zip(path[:-1], path[1:])))


# ----------------------------------------------------------------------------------------------
# 4. The whole search over warm-up rounds.

def _gather_in_order(index_rows):
    """index_rows: list of (global_index, tensor) from this rank. Returns the tensors of all ranks
    stacked in global-index order (so reductions do not depend on the split)."""
    rows = [r for part in dist.all_gather_object([(i, t.cpu()) for i, t in index_rows]) for r in part]
    rows.sort(key=lambda r: r[0])
    return torch.stack([t for _, t in rows])


def search_rounds(rounds, *, num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0,
                  solver_tea='ipndm', num_steps_tea=61, metric='dev', coeff=1.15, afs=False, solver=None,
                  model=None, all_num_steps=None, **options):
    """GITS over warm-up `rounds`: a list of (first_index, denoise, latents) with latents standard
    normal; first_index numbers the round's trajectories globally (for order-exact reduction
    across processes). Returns ({num_steps: t_steps}, info)."""
    t_tea = solver_utils.get_schedule(num_steps_tea, sigma_min, sigma_max, schedule_type, schedule_rho, model=model)
    wanted = sorted(set(all_num_steps or [num_steps]))
    if max(wanted) > num_steps_tea:
        raise ValueError(f'--num_steps_tea: {num_steps_tea} is smaller than --num_steps {max(wanted)}')
    timing = dict(teacher=0.0, cost=0.0, dp=0.0, afs=0.0)
    per_traj, finals, teacher_evals = [], [], 0
    for first, denoise, latents in rounds:
        t0 = time.perf_counter()
        with torch.no_grad():
            xs, ds, evals = teacher_trajectory(denoise, latents, t_tea, solver_tea)
        teacher_evals += evals
        t1 = time.perf_counter()
        costs = trajectory_costs(xs, ds, t_tea, metric)
        timing['teacher'] += t1 - t0
        timing['cost'] += time.perf_counter() - t1
        for j in range(costs.shape[0]):
            per_traj.append((first + j, costs[j]))
            finals.append((first + j, xs[-1, j].to(torch.float64)))
    all_costs = _gather_in_order(per_traj)
    cost = all_costs.mean(0)
    t0 = time.perf_counter()
    paths = dp_all(cost, coeff, max(wanted) - 1)
    timing['dp'] = time.perf_counter() - t0
    schedules, chosen = {}, {}
    for n in wanted:
        path = paths[n - 1]
        t_steps = t_tea[path].clone()
        if afs:
            t1 = time.perf_counter()
            t_steps, path = _afs_free_step(rounds, finals, t_tea, path, solver or 'ipndm', options)
            timing['afs'] += time.perf_counter() - t1
        schedules[n] = t_steps
        chosen[n] = path
    info = dict(teacher_grid=[float(t) for t in t_tea], indices={str(k): v for k, v in chosen.items()},
                num_warmup=int(all_costs.shape[0]), teacher_evals_this_rank=teacher_evals,
                metric=metric, coeff=coeff, solver_tea=solver_tea, num_steps_tea=num_steps_tea,
                seconds=timing)
    return schedules, info


def _afs_free_step(rounds, finals, t_tea, path, solver, options):
    """Insert the teacher point between path[0] and path[1] that, with afs on, brings the student's
    output closest to the teacher's final points. No candidate: the schedule stays as it is."""
    candidates = list(range(path[0] + 1, path[1]))
    if not candidates:
        return t_tea[path].clone(), path
    final_by_index = dict(finals)
    fn = solvers.SOLVERS[solver]
    errors = []
    for first, denoise, latents in rounds:
        for m in candidates:
            trial = t_tea[[path[0], m] + path[1:]]
            with torch.no_grad():
                x = fn(denoise, latents * float(trial[0]), trial, afs=True, **options)
            x = x.reshape(x.shape[0], -1).to(torch.float64)
            for j in range(x.shape[0]):
                ref = final_by_index[first + j].reshape(-1).to(x.device)
                errors.append(((first + j, m), (x[j] - ref).square().sum().sqrt().cpu()))
    per_candidate = []
    for m in candidates:
        mine = [(idx, e) for (idx, mm), e in errors if mm == m]
        per_candidate.append(_gather_in_order(mine).mean())
    best = candidates[int(torch.stack(per_candidate).argmin())]
    new_path = [path[0], best] + path[1:]
    return t_tea[new_path].clone(), new_path


def search_schedule(denoise, latents, *, num_steps, sigma_min, sigma_max, schedule_type='polynomial',
                    schedule_rho=7.0, solver_tea='ipndm', num_steps_tea=61, metric='dev', coeff=1.15,
                    afs=False, solver=None, model=None, batch_size=None, **options):
    """The searched t_steps (float64) for `denoise` on the warm-up noise `latents` (standard
    normal, one process). `batch_size` splits the warm-up set into rounds."""
    bs = batch_size or latents.shape[0]
    rounds = [(i, denoise, latents[i:i + bs]) for i in range(0, latents.shape[0], bs)]
    schedules, _ = search_rounds(rounds, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                                 schedule_type=schedule_type, schedule_rho=schedule_rho, solver_tea=solver_tea,
                                 num_steps_tea=num_steps_tea, metric=metric, coeff=coeff, afs=afs,
                                 solver=solver, model=model, **options)
    return schedules[num_steps]


# ----------------------------------------------------------------------------------------------
# sample.py integration.

def validate_options(opts):
    """Checks of the GITS flags that need no model; UserError with one line naming the flag."""
    if opts.coeff is None or not opts.coeff > 0:
        raise UserError(f'--coeff: must be positive (got {opts.coeff})')
    if opts.num_warmup is None or opts.num_warmup < 1:
        raise UserError(f'--num_warmup: must be at least 1 (got {opts.num_warmup})')
    if opts.num_steps_tea < opts.num_steps:
        raise UserError(f'--num_steps_tea: must be at least --num_steps ({opts.num_steps}); got {opts.num_steps_tea}')
    if opts.metric not in METRICS:
        raise UserError(f'--metric: must be one of {", ".join(METRICS)}')
    if opts.t_steps is not None:
        raise UserError('--dp: cannot be combined with --t_steps (the schedule is given); drop one of them')
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
    from sample import draw_seed_inputs, split_batches
    seeds = list(range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup))
    rank, world = dist.get_rank(), dist.get_world_size()
    rounds = []
    for batch in split_batches(seeds, opts.batch, world)[rank::world]:
        if not batch:
            continue
        noise, labels = draw_seed_inputs(batch, model.shape, model.label_dim)
        if labels is not None and opts.class_idx is not None:
            labels[:] = opts.class_idx
        denoise = model.bind(**model.conditioning(batch, labels))
        rounds.append((batch[0] - opts.warmup_seed, denoise, noise.to(device=device, dtype=torch.float32)))
    return rounds


def search_for_sampling(model, opts, sigma_min, sigma_max, device):
    """Run the search for sample.py; with --save_schedules, write every requested num_steps."""
    all_steps = opts.save_num_steps_list if opts.save_schedules else [opts.num_steps]
    try:
        schedules, info = search_rounds(
            warmup_rounds(model, opts, device), num_steps=opts.num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
            schedule_type=opts.schedule_type, schedule_rho=opts.schedule_rho, solver_tea=opts.solver_tea,
            num_steps_tea=opts.num_steps_tea, metric=opts.metric, coeff=opts.coeff, afs=bool(opts.afs),
            solver=opts.solver, model=model, all_num_steps=all_steps, **opts.solver_options)
    except ValueError as e:
        raise UserError(str(e)) from None
    dist.print0('GITS search: {teacher:.2f}s teacher, {cost:.2f}s cost matrix, {dp:.3f}s DP, {afs:.2f}s afs'.format(**info['seconds']))
    if opts.save_schedules:
        if dist.get_rank() == 0:
            save_schedules(opts.save_schedules, schedules, opts, info)
        info['saved_num_steps'] = sorted(schedules)
        dist.barrier()
    return schedules[opts.num_steps] if opts.num_steps in schedules else None, info


def save_schedules(path, schedules, opts, info):
    record = dict(
        format='gits-schedules-v1', dataset_name=opts.dataset_name, solver=opts.solver, afs=bool(opts.afs),
        schedule_type=opts.schedule_type, schedule_rho=opts.schedule_rho, metric=opts.metric, coeff=opts.coeff,
        solver_tea=opts.solver_tea, num_steps_tea=opts.num_steps_tea, num_warmup=opts.num_warmup,
        warmup_seed=opts.warmup_seed,
        schedules={str(n): [float(t) for t in ts] for n, ts in sorted(schedules.items())},
        t_steps_text={str(n): solver_utils.format_t_steps(ts) for n, ts in sorted(schedules.items())},
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
