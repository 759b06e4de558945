"""GITS: geometry-inspired time scheduling (Chen et al., ICML 2024, arXiv:2405.11326).

Sampling trajectories of the probability-flow ODE share a strong shape regularity, so a schedule
fitted on a few warm-up trajectories serves all samples. This file is the paper's algorithm, top
to bottom:

1. a fine teacher solver runs on warm-up noise over `num_steps_tea` points of the student's
   schedule type, keeping every point x_i and its raw slope d_i = (x_i - D(x_i; t_i)) / t_i
   (`run_teachers`);
2. every coarse step i -> j is priced by one Euler step from the teacher point,
   xhat = x_i + (t_j - t_i) d_i, against the teacher point x_j (`trajectory_costs`; where a CPU
   core is idle, a round's matrices are computed while the next round's teacher runs);
3. dynamic programming picks the cheapest path of K = num_steps - 1 steps (`dp`); one cost
   matrix gives the best path for every K (`dp_all`);
4. with afs, each teacher point strictly between the first two chosen ones is tried as a free
   extra step, and the one whose student output is closest to the teacher's is kept
   (`afs_free_step`).

`search_rounds` runs the four over warm-up rounds (possibly spread over processes) as three
stages, `start_search` (1), `gits_paths` (2, 3) and `afs_paths` (4), and `search_schedule` over
one tensor of warm-up noise. What goes beyond the paper (a DP that prices the student solver's own
steps, and refinement of the schedule) is in student_search.py, which extends these stages. What
the official code does differently (--compat=gits-main) is in gits_main.py.

Everything is per trajectory in float64 and reduced in warm-up-index order, so the schedule is
the same bit for bit whatever the batch size or number of processes.
"""

import concurrent.futures
import dataclasses
import math
import os
import time

import torch

import schedules
import solver_utils
import solvers
from schedules import compat_mode
from torch_utils import distributed as dist

METRICS = ('dev', 'l1', 'l2')

# The method's defaults, defined here once; every command line and function reads these.
METRIC = 'dev'
COEFF = 1.15                  # the paper's DP coefficient (ms_coco uses 1.20)
SOLVER_TEA = 'ipndm'
NUM_STEPS_TEA = 61            # the README's value (the paper's code defaulted to 21 by mistake)
NUM_WARMUP = 256
WARMUP_SEED = 1_000_000_000   # first warm-up seed: far from the sampling seeds


# ----------------------------------------------------------------------------------------------
# 1. Teacher trajectories.

class TeacherRound:
    """One warm-up round and its teacher run: points xs [N, B, ...], raw slopes ds and denoiser
    outputs dens [N-1, B, ...] at the teacher points (the teacher's own calls, no extra
    evaluation; none is needed at the last point). `first` numbers the round's trajectories
    globally, so that reductions can follow the warm-up index whatever the split. `pending`: cost
    matrices that `run_teachers` started, by (metric, teacher grid)."""

    def __init__(self, first, denoise, latents, xs, ds, dens):
        self.first, self.denoise, self.latents = first, denoise, latents
        self.xs, self.ds, self.dens = xs, ds, dens
        self.pending = {}

    @property
    def size(self):
        return self.xs.shape[1]

    def costs(self, t_tea, metric):
        """(`trajectory_costs` of this round, seconds they took on a helper thread): the ones
        `run_teachers` started (waiting for them), else computed now (0 seconds)."""
        pending = self.pending.pop(_cost_key(t_tea, metric), None)
        if pending is not None:
            return pending.result()
        return trajectory_costs(self.xs, self.ds, t_tea, metric), 0.0


def teacher_run(denoise, latents, t_tea, solver_tea=SOLVER_TEA, afs=False, compat=None, **options):
    """The teacher on `latents` (standard normal; it starts at latents * t_tea[0]). Returns
    (xs, ds, dens, recorder): the recorder counts the denoiser calls and evaluations spent. With
    afs (only the official search, compat) the teacher's first slope is the analytical one, and
    that is the slope recorded at t_tea[0] (its 'denoiser output' there is x - t d, no call)."""
    rec = solver_utils.Recorder(denoise, keep=True)
    _, xs = solvers.SOLVERS[solver_tea](rec, latents * float(t_tea[0]), t_tea, afs=afs, return_inters=True,
                                        compat=compat, **options)
    ds, dens = [], []
    for i, t in enumerate(t_tea[:-1]):
        if afs and i == 0:
            d = solver_utils.afs_slope(xs[0], t)
            dens.append(xs[0] - float(t) * d)
            ds.append(d)
            continue
        out = rec.lookup(xs[i], float(t))
        if out is None:      # the solver evaluated elsewhere (e.g. UniPC's corrector moved the point)
            out = rec(xs[i], float(t))
        dens.append(out)
        ds.append((xs[i] - out) / float(t))
    return xs, torch.stack(ds), torch.stack(dens), rec


def teacher_trajectory(denoise, latents, t_tea, solver_tea=SOLVER_TEA, **options):
    """Teacher points xs [N, B, ...], raw slopes ds [N-1, B, ...] and the number of denoiser
    calls."""
    xs, ds, _, rec = teacher_run(denoise, latents, t_tea, solver_tea, **options)
    return xs, ds, rec.calls


def spare_core(device):
    """Does a CPU core sit idle beside torch's own threads (and beside the other processes that
    torchrun started on this machine)? Only then does work on a helper thread run beside the main
    thread's instead of taking turns with it: on 2 cores, `gmm`'s cost matrices beside a one-thread
    teacher left it as fast, beside a two-thread one they slowed it by a quarter. Not on an
    accelerator (unmeasured there, and the matrices are cheap on one)."""
    if torch.device(device).type != 'cpu':
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))


def _cost_key(t_tea, metric):
    return metric, tuple(float(t) for t in t_tea)


def _timed_costs(xs, ds, t_tea, metric):
    t0 = time.perf_counter()
    with torch.no_grad():                     # grad mode is per thread
        costs = trajectory_costs(xs, ds, t_tea, metric)
    return costs, time.perf_counter() - t0


def run_teachers(rounds, t_tea, solver_tea=SOLVER_TEA, afs=False, compat=None, metric=None, overlap=None, **options):
    """Teacher runs for every warm-up round (first_index, denoise, latents). Returns
    ([TeacherRound], denoiser calls on this rank, evaluations (batch rows) on this rank). With
    `metric` and `overlap` (None: where a core is idle, `spare_core`), each round's cost matrices
    start on a helper thread as soon as its teacher has run, so that they are computed while the
    next round's teacher runs, and `TeacherRound.costs` waits for them; only the last round's are
    left for after the teachers. They are the same numbers either way (each trajectory's costs are
    its own, whatever the thread)."""
    data, calls, evals = [], 0, 0
    if overlap is None:
        overlap = metric is not None and bool(rounds) and spare_core(rounds[0][2].device)
    helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='gits-costs') if overlap else None
    try:
        for first, denoise, latents in rounds:
            with torch.no_grad():
                xs, ds, dens, rec = teacher_run(denoise, latents, t_tea, solver_tea, afs, compat, **options)
            rnd = TeacherRound(first, denoise, latents, xs, ds, dens)
            if helper is not None:
                rnd.pending[_cost_key(t_tea, metric)] = helper.submit(_timed_costs, xs, ds, t_tea, metric)
            data.append(rnd)
            calls += rec.calls
            evals += rec.evals
    finally:
        if helper is not None:
            helper.shutdown(wait=False)       # what was submitted still runs
    return data, calls, evals


# The teacher's solver options. The official code passes one set of solver flags to the student
# and to the teacher, so the teacher runs with the student's --max_order, --predict_x0,
# --lower_order_final (and --deis_mode, --variant): we do the same. By default the teacher takes,
# for each option it has, the student's resolved value (its default where the flag is not given),
# or the flag itself where only the teacher has the option (--max_order with a Heun student and the
# iPNDM teacher), else its own default; a max_order beyond the teacher's range is capped (an
# order-4 iPNDM student gives a DPM-Solver++ teacher order 3). With compat, the reproduced code's
# teacher flags (gits_main.teacher_flags: the flags as given, a refusal where it fails).

def _teacher_flags(solver_tea, student, given):
    """The teacher's option flags: the student's resolved options and the teacher-only flags."""
    takes = solvers.SOLVER_SPECS[solver_tea].defaults
    inherited = {k: student[k] if k in student else given[k] for k in takes if k in student or k in given}
    if 'max_order' in inherited:
        inherited['max_order'] = min(int(inherited['max_order']), solvers.SOLVER_SPECS[solver_tea].max_order_range[1])
    return inherited


def search_options(solver, solver_tea, options, compat=None, num_steps_tea=None):
    """(student options, teacher options), resolved, from one set of solver option flags
    (`options`; None or missing: not given). ValueError in one line naming the flag."""
    mode = compat_mode(compat)
    for flag, name in (('--solver', solver), ('--solver_tea', solver_tea)):
        if name not in solvers.SOLVERS:
            raise ValueError(f'{flag}: unknown solver "{name}"; choose one of {", ".join(solvers.SOLVERS)}')
    given = {k: v for k, v in options.items() if v is not None}
    takes = {name: solvers.SOLVER_SPECS[name].defaults for name in (solver, solver_tea)}
    # A flag goes to the student unless only the teacher has that option.
    student = solvers.resolve_options(solver, {k: v for k, v in given.items()
                                               if k in takes[solver] or k not in takes[solver_tea]}, compat)
    if mode:
        inherited = mode.teacher_flags(solver, solver_tea, given, solvers.SOLVER_SPECS)
    else:
        inherited = _teacher_flags(solver_tea, student, given)
    try:
        teacher = solvers.resolve_options(solver_tea, inherited, compat, num_points=num_steps_tea)
    except ValueError as e:
        raise ValueError(f'{e} (the GITS teacher --solver_tea={solver_tea} runs with the student\'s solver options, '
                         'as in the official code)') from None
    return student, teacher


# ----------------------------------------------------------------------------------------------
# 2. Cost matrix.

def _dev_terms(x, d, start, direction, work, terms):
    """|p_i|, |q_i|, p_i.q_i and |p_i - c_i q_i| of `_dev_costs`, written into `terms` [4, T, R],
    for points x and slopes d [T, R, D] (R rows of T trajectories; line starts and unit directions
    [T, D], float64). The vectors p, q and a scratch one live in a flat float64 buffer `work` (at
    least 3 T R D numbers) reused for every block (fresh temporaries would be page-faulted in each
    time), viewed so that a trajectory's p and q rows form one contiguous matrix. The projections
    are one matrix-vector product and one rank-1 update per trajectory; the rest is elementwise or
    reduces one row at a time, so a trajectory's terms do not depend on the trajectories that share
    its block (they can on where its rows fall in the block: see `_dev_costs`)."""
    t, r, dim = x.shape
    size = t * r * dim
    pairs = work[:2 * size].view(t, 2, r, dim)                             # [T, (p, q), R, D]
    p, q = pairs.unbind(1)
    scratch = work[2 * size:3 * size].view(t, r, dim)
    p.copy_(x).sub_(start[:, None])                                        # (a mixed-dtype sub is slower)
    q.copy_(d)
    for k in range(t):                                                     # v -= (v.u) u, for p and q
        rows = pairs[k].flatten(0, 1)
        rows.addr_(torch.mv(rows, direction[k]), direction[k], alpha=-1)
    torch.linalg.vector_norm(pairs, dim=-1, out=terms[:2].transpose(0, 1))
    torch.sum(torch.mul(p, q, out=scratch), dim=-1, out=terms[2])
    centre = torch.div(terms[2], terms[1].square()).nan_to_num_(0.0)      # 0 where q = 0 (then p.q = 0)
    p.addcmul_(q, centre[..., None], value=-1)                             # p - c q
    torch.linalg.vector_norm(p, dim=-1, out=terms[3])


def _dev_costs(xs, ds, ts, chunk_elems=3 << 15):
    """`dev` costs [B, N-1, N] in O(N B D): the distance of xhat = x_i + h d_i from the line through
    the trajectory's first and last points is |p_i + h q_i|, with p_i, q_i the parts of x_i - x_0
    and d_i orthogonal to the line, a function of h through three numbers per (i, trajectory).
    Written as sqrt(m_i + |q_i|^2 (h + c_i)^2), c_i = p_i.q_i / |q_i|^2 and m_i = |p_i - c_i q_i|^2
    (the squared distance of the line h -> p_i + h q_i from the origin, computed as a vector), both
    terms are non-negative and nothing cancels; the expanded |p|^2 + 2h p.q + h^2 |q|^2 loses ~1e-11
    absolutely (hundreds of times the direct computation's rounding) when the Euler step lands close
    to the line. In blocks of about `chunk_elems` numbers per vector: rows of one trajectory, or
    whole trajectories when one is smaller than that. The default, 32 rows of 3x32x32, was the one
    size within noise of the fastest on both machines measured: where memory is fast, 16 rows (the
    core's L2) beat whole trajectories by 1.35x and 8-42 rows tied; where each operation carries a
    fixed cost (~15 us in the profile), whole trajectories beat 16 rows by 1.45x and 32 rows came
    within 12%. The block does not follow the thread count: the matrix-vector product's rounding
    depends on a row's place in its block, and a schedule must not depend on the threads (tested)."""
    n, b = xs.shape[0], xs.shape[1]
    xs, ds = xs.reshape(n, b, -1).transpose(0, 1), ds.reshape(n - 1, b, -1).transpose(0, 1)   # [B, N, D]
    start = xs[:, 0].to(torch.float64)
    direction = xs[:, -1].to(torch.float64) - start
    direction /= direction.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    rows = max(1, min(n - 1, chunk_elems // ds.shape[-1]))
    block = max(1, min(b, chunk_elems // ds[0].numel())) if rows == n - 1 else 1
    work = torch.empty([3 * block * rows * ds.shape[-1]], dtype=torch.float64, device=xs.device)
    terms = torch.zeros([4, b, n - 1], dtype=torch.float64, device=xs.device)
    for b0 in range(0, b, block):
        b1 = min(b, b0 + block)
        for r0 in range(0, n - 1, rows):
            r1 = min(n - 1, r0 + rows)
            _dev_terms(xs[b0:b1, r0:r1], ds[b0:b1, r0:r1], start[b0:b1], direction[b0:b1], work,
                       terms[:, b0:b1, r0:r1])
    p_norm, q_norm, pq, m_root = terms                                     # [B, N-1] each
    q_sq = q_norm.square()
    centre = torch.where(q_sq > 0, pq / q_sq, 0.0)
    # The last point lies on the line by construction: its distance is 0.
    dev_teacher = torch.cat([p_norm, p_norm.new_zeros([b, 1])], dim=1)
    h = ts[None, :] - ts[:-1, None]                                        # [N-1, N]: t_j - t_i
    # sqrt(m + |q|^2 (h + c)^2) - dev_teacher, in place in one [B, N-1, N] buffer.
    out = torch.add(h[None], centre[:, :, None])
    out.square_().mul_(q_sq[:, :, None]).add_(m_root.square()[:, :, None]).sqrt_()
    return out.sub_(dev_teacher[:, None, :])


def _norm_costs(xs, ds, ts, metric, chunk_elems=1 << 18):
    """`l1`/`l2` costs [B, N-1, N]: the norm of the Euler error xhat - x_j, computed directly, in
    blocks of j of about `chunk_elems` numbers in one reused buffer. A Gram-matrix form of l2
    (|x_i - x_j|^2 + 2h d_i.(x_i - x_j) + h^2 |d_i|^2 from dot products) cancels: a near-exact step's
    error is down to ~1e-8 of |x_i|, its square below the rounding of the dot products (measured on
    gmm's teacher trajectories: relative errors up to 3)."""
    n, b = xs.shape[0], xs.shape[1]
    xs = xs.reshape(n, b, -1).to(torch.float64)
    ds = ds.reshape(n - 1, b, -1).to(torch.float64)
    out = torch.zeros([n - 1, n, b], dtype=torch.float64, device=xs.device)
    rows = max(1, min(n - 1, chunk_elems // xs[0].numel()))
    work = torch.empty([rows, *xs.shape[1:]], dtype=torch.float64, device=xs.device)
    for i in range(n - 1):
        for j0 in range(i + 1, n, rows):
            j1 = min(n, j0 + rows)
            err = torch.mul((ts[j0:j1] - ts[i]).view(-1, 1, 1), ds[i][None], out=work[:j1 - j0])
            err.add_(xs[i][None]).sub_(xs[j0:j1])                               # xhat - x_j
            out[i, j0:j1] = err.abs_().sum(-1) if metric == 'l1' else err.square_().sum(-1).sqrt()
    return out.permute(2, 0, 1)


def trajectory_costs(xs, ds, t_tea, metric='dev'):
    """Per-trajectory cost matrices [B, N, N] (float64; +inf where i >= j). Every reduction runs
    over one trajectory's own dimensions, so a trajectory's costs do not depend on its batch."""
    if metric not in METRICS:
        raise ValueError(f'--metric: unknown metric "{metric}"; choose one of {", ".join(METRICS)}')
    n, b = xs.shape[0], xs.shape[1]
    ts = torch.as_tensor([float(t) for t in t_tea], dtype=torch.float64, device=xs.device)
    body = _dev_costs(xs, ds, ts) if metric == 'dev' else _norm_costs(xs, ds, ts, metric)
    cost = torch.full([b, n, n], math.inf, dtype=torch.float64)
    cost[:, :-1] = body.cpu()
    cost.masked_fill_(~torch.ones(n, n, dtype=torch.bool).triu(1), math.inf)
    return cost


# ----------------------------------------------------------------------------------------------
# 3. Dynamic programming.

def dp_all(cost, coeff=COEFF, max_steps=None):
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


def dp(cost, num_steps, coeff=COEFF):
    """Indices (into the teacher grid) of the best `num_steps`-point schedule."""
    k = int(num_steps) - 1
    paths = dp_all(cost, coeff, k)
    if k not in paths:
        raise ValueError(f'--num_steps: {num_steps} points do not fit a teacher grid of {len(cost)}')
    return paths[k]


def path_cost(cost, path, coeff):
    return sum(coeff ** k * float(cost[a][b]) for k, (a, b) in enumerate(zip(path[:-1], path[1:])))


# ----------------------------------------------------------------------------------------------
# 4. The analytical first step's free step.
#
# Ours keeps the teacher exact (no afs) and tries every teacher point between the first two chosen
# ones as a free extra step. The official (compat) gives the teacher the analytical first step,
# which mostly leaves no candidate, and runs the candidates its own way (gits_main.py, section 5).

def _trial_runner(solver, options, compat, t_tea):
    """How a free-step candidate schedule is run: the student solver with afs (with compat, as the
    reproduced code runs it: for some solvers its own coefficient rows)."""
    mode = compat_mode(compat)
    table = mode.trial_table(solver, options, t_tea) if mode else None
    if table is not None:
        return lambda denoise, x, trial: solvers.run_table(denoise, x, trial, table(trial), afs=True)
    fn = solvers.SOLVERS[solver]
    return lambda denoise, x, trial: fn(denoise, x, trial, afs=True, compat=compat, **options)


def afs_free_step(data, t_tea, path, solver, options, compat=None):
    """Insert the teacher point between path[0] and path[1] that, with afs on, brings the student's
    output closest to the teacher's final points (mean per-trajectory L2 distance). Returns
    (t_steps, path, evaluations spent on this rank). No candidate: the schedule stays as it is."""
    candidates = list(range(path[0] + 1, path[1]))
    if not candidates:
        return t_tea[path].clone(), path, 0
    run = _trial_runner(solver, options, compat, t_tea)
    per_candidate, evals = [], 0
    for m in candidates:
        trial = t_tea[[path[0], m] + path[1:]]
        rows = []
        for rnd in data:
            rec = solver_utils.Recorder(rnd.denoise)
            with torch.no_grad():
                x = run(rec, rnd.latents * float(trial[0]), trial)
            evals += rec.evals
            x = x.reshape(x.shape[0], -1).to(torch.float64)
            e = (x - rnd.xs[-1].reshape(x.shape[0], -1).to(torch.float64).to(x.device)).square().sum(-1).sqrt().cpu()
            rows.extend((rnd.first + b, e[b]) for b in range(x.shape[0]))
        per_candidate.append(dist.gather_in_order(rows).mean())
    best = candidates[int(torch.stack(per_candidate).argmin())]
    new_path = [path[0], best] + path[1:]
    return t_tea[new_path].clone(), new_path, evals


# ----------------------------------------------------------------------------------------------
# 5. The search over warm-up rounds.

def gits_paths(data, t_tea, wanted, metric=METRIC, coeff=COEFF, timing=None):
    """Steps 2 and 3: the Euler-step cost matrix, averaged over all trajectories in warm-up-index
    order, then the DP. Returns {num_steps: path} for every num_steps in `wanted`. timing: 'cost'
    is the wall time spent here on the matrices (with the wait for those started by
    `run_teachers`), 'cost_helper' the time those took on the helper thread."""
    timing = timing if timing is not None else {}
    t0 = time.perf_counter()
    per_traj, helper = [], 0.0
    for rnd in data:
        costs, seconds = rnd.costs(t_tea, metric)
        helper += seconds
        per_traj.extend((rnd.first + b, costs[b]) for b in range(costs.shape[0]))
    cost = dist.gather_in_order(per_traj).mean(0)
    t1 = time.perf_counter()
    paths = dp_all(cost, coeff, max(wanted) - 1)
    timing['cost'] = timing.get('cost', 0.0) + t1 - t0
    timing['dp'] = timing.get('dp', 0.0) + time.perf_counter() - t1
    if helper:
        timing['cost_helper'] = timing.get('cost_helper', 0.0) + helper
    return {n: paths[n - 1] for n in wanted}


def teacher_grid(num_steps_tea, sigma_min, sigma_max, schedule_type, schedule_rho, model, wanted, compat=None):
    """The teacher's time points: `num_steps_tea` points of the student's schedule type (with
    compat, the reproduced code's schedule)."""
    if max(wanted) > num_steps_tea:
        raise ValueError(f'--num_steps_tea: {num_steps_tea} is smaller than --num_steps {max(wanted)}')
    return schedules.get_schedule(num_steps_tea, sigma_min, sigma_max, schedule_type, schedule_rho, model=model,
                                  compat=compat)


@dataclasses.dataclass
class Search:
    """A search after its first stage (`start_search`): what the later stages build on (the
    paper's cost matrix and DP, `gits_paths`, and free step, `afs_paths`, here; the solver-aware
    search and refinement, student_search.py)."""
    t_tea: torch.Tensor         # the teacher grid
    wanted: list                # the numbers of points searched for, ascending
    solver: str                 # the student
    options: dict               # the student's resolved options
    teacher_options: dict
    teacher_afs: bool
    data: list                  # [TeacherRound] of this rank
    teacher_calls: int          # denoiser calls of the teachers on this rank
    teacher_evals: int          # evaluations (batch rows) of the teachers, all ranks
    num_warmup: int             # warm-up trajectories, all ranks
    timing: dict


def start_search(rounds, *, num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, solver_tea, num_steps_tea,
                 afs, solver, model, all_num_steps, compat, metric, timing, **options):
    """Step 1 for every search: the teacher grid, the student's and the teacher's options, and the
    teacher runs (their cost matrices for `metric` started on a helper thread where a core is
    idle; None: no matrices wanted). `timing['teacher']`: the teachers' wall time."""
    mode = compat_mode(compat)
    wanted = sorted(set(all_num_steps or [num_steps]))
    t_tea = teacher_grid(num_steps_tea, sigma_min, sigma_max, schedule_type, schedule_rho, model, wanted, compat)
    solver = solver or 'ipndm'
    options, teacher_options = search_options(solver, solver_tea, options, compat, num_steps_tea)
    teacher_afs = bool(afs) and bool(mode and mode.teacher_afs)
    t0 = time.perf_counter()
    data, calls, evals = run_teachers(rounds, t_tea, solver_tea, teacher_afs, compat, metric=metric, **teacher_options)
    timing['teacher'] = time.perf_counter() - t0
    return Search(t_tea, wanted, solver, options, teacher_options, teacher_afs, data, calls,
                  dist.sum_over_ranks(evals), int(dist.sum_over_ranks(sum(r.size for r in data))), timing)


def afs_paths(search, paths, schedule_type, solver_tea, compat=None):
    """Step 4 for every path of `paths` ({num_steps: path}): the path with its free step. Returns
    (paths, evaluations, all ranks); `search.timing['afs']` adds their wall time. With compat,
    refused where the reproduced code fails on its candidates."""
    mode = compat_mode(compat)
    out, evals = {}, 0
    for n, path in paths.items():
        if mode and path[1] - path[0] > 1:          # the reproduced code has candidates to try
            failure = mode.trial_failure(search.solver, search.options, n, solver_tea, schedule_type)
            if failure:
                raise ValueError(failure)
        t0 = time.perf_counter()
        _, out[n], spent = afs_free_step(search.data, search.t_tea, path, search.solver, search.options, compat)
        evals += spent
        search.timing['afs'] += time.perf_counter() - t0
    return out, dist.sum_over_ranks(evals)


def search_rounds(rounds, *, num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0,
                  solver_tea=SOLVER_TEA, num_steps_tea=NUM_STEPS_TEA, metric=METRIC, coeff=COEFF, afs=False, solver=None,
                  model=None, all_num_steps=None, compat=None, denoise_to_zero=False, **options):
    """The paper's search over warm-up `rounds`: a list of (first_index, denoise, latents) with
    latents standard normal; first_index numbers the round's trajectories globally (for
    order-exact reduction across processes). `solver` and `options` are the student's solver and
    option flags; the teacher takes them too (`search_options`), and the student's matter for
    afs's free step. compat='gits-main': the official code's search (gits_main.py: its teacher grid,
    teacher options and afs teacher, its solvers; refused where it fails). `denoise_to_zero` is the
    student's: only compat needs it (the official also denoises the teacher to zero, which is not
    reproduced: refused). Returns ({num_steps: t_steps} for num_steps and every all_num_steps, info)."""
    mode = compat_mode(compat)
    if mode:
        mode.check_search(denoise_to_zero)
    search = start_search(rounds, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                          schedule_type=schedule_type, schedule_rho=schedule_rho, solver_tea=solver_tea,
                          num_steps_tea=num_steps_tea, afs=afs, solver=solver, model=model, all_num_steps=all_num_steps,
                          compat=compat, metric=metric, timing=dict(teacher=0.0, cost=0.0, dp=0.0, afs=0.0), **options)
    paths = gits_paths(search.data, search.t_tea, search.wanted, metric, coeff, search.timing)
    afs_evals = 0
    if afs:
        paths, afs_evals = afs_paths(search, paths, schedule_type, solver_tea, compat)
    schedules_found = {n: search.t_tea[path].clone() for n, path in paths.items()}
    info = dict(teacher_grid=[float(t) for t in search.t_tea], indices={str(n): p for n, p in paths.items()},
                num_warmup=search.num_warmup, teacher_evals_this_rank=search.teacher_calls,
                evals=dict(teacher=search.teacher_evals, afs=afs_evals),
                search='gits', refine=False, metric=metric, coeff=coeff, solver_tea=solver_tea,
                num_steps_tea=num_steps_tea, teacher_options=search.teacher_options, teacher_afs=search.teacher_afs,
                compat=compat, seconds=search.timing)
    return schedules_found, info


def warmup_split(denoise, latents, batch_size=None):
    """One process's warm-up noise as rounds of at most `batch_size` trajectories."""
    bs = batch_size or latents.shape[0]
    return [(i, denoise, latents[i:i + bs]) for i in range(0, latents.shape[0], bs)]


def search_schedule(denoise, latents, *, num_steps, batch_size=None, **kw):
    """The searched t_steps (float64) for `denoise` on the warm-up noise `latents` (standard
    normal, one process); `batch_size` splits the warm-up set into rounds. Keywords as
    search_rounds: sigma_min, sigma_max, schedule_type, schedule_rho, solver_tea, num_steps_tea,
    metric, coeff, afs, solver, model, compat, denoise_to_zero, and the solver option flags."""
    schedules, _ = search_rounds(warmup_split(denoise, latents, batch_size), num_steps=num_steps, **kw)
    return schedules[num_steps]
