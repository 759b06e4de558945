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

Beyond the paper (issue 10): search='student' prices each step by the student solver's own
update (its order, history, afs, midpoint/corrector evaluations) against the teacher point
(`price_step`, `student_dp`); refine=True then moves the interior points, in log sigma, to
minimise the student's final-point error on the warm-up set within a budget of denoiser
evaluations (`refine_schedule`), starting from the best of GITS, solver-aware and fixed schedules.

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


def _teacher_run(denoise, latents, t_tea, solver_tea='ipndm', **options):
    """Teacher points xs [N, B, ...], slopes ds and denoiser outputs dens [N-1, B, ...] (none is
    needed at the last point), and the number of denoiser calls."""
    rec = _RecordingDenoiser(denoise)
    x0 = latents * float(t_tea[0])
    _, xs = solvers.SOLVERS[solver_tea](rec, x0, t_tea, return_inters=True, **options)
    ds, dens = [], []
    for i, t in enumerate(t_tea[:-1]):
        hit = rec.calls.get(float(t))
        if hit is not None and hit[0].shape == xs[i].shape and torch.equal(hit[0], xs[i]):
            d_out = hit[1]
        else:   # the solver evaluated elsewhere (e.g. UniPC's corrector moved the point)
            d_out = denoise(xs[i], float(t))
        dens.append(d_out)
        ds.append((xs[i] - d_out) / float(t))
    return xs, torch.stack(ds), torch.stack(dens), rec.count


def teacher_trajectory(denoise, latents, t_tea, solver_tea='ipndm', **options):
    """Teacher points xs [N, B, ...] and raw slopes ds [N-1, B, ...] (no slope is needed at the
    last point). `latents` are standard normal; the teacher starts at latents * t_tea[0]."""
    xs, ds, _, count = _teacher_run(denoise, latents, t_tea, solver_tea, **options)
    return xs, ds, count


# ----------------------------------------------------------------------------------------------
# 2. Cost matrix.

def _dev_terms(x, d, start, direction, work):
    """|p_i|, |q_i|^2, c_i and m_i of `_dev_costs` ([T, N-1] each) for a block of T trajectories:
    points x and slopes d [T, N-1, D], line starts and unit directions [T, D] (float64). The
    vectors live in a float64 buffer `work` ([>= T, 3, N-1, D]: p, q, scratch) reused for every
    block: fresh temporaries would be page-faulted in each time, which costs more than the
    arithmetic. The projections are one matrix-vector product and one rank-1 update per trajectory
    (a pass each, on the same shapes for every trajectory); the rest is elementwise or reduces one
    row at a time, so a trajectory's terms do not depend on the block it came in."""
    t = x.shape[0]
    p, q, scratch = work[:t].unbind(1)
    both = work[:t, :2].flatten(1, 2)                                      # [T, 2(N-1), D]: p over q
    p.copy_(x).sub_(start[:, None])
    q.copy_(d)
    for k in range(t):                                                     # v -= (v.u) u
        both[k].addr_(torch.mv(both[k], direction[k]), direction[k], alpha=-1)
    p_norm = torch.linalg.vector_norm(p, dim=-1)
    q_sq = torch.linalg.vector_norm(q, dim=-1).square()
    centre = torch.where(q_sq > 0, torch.mul(p, q, out=scratch).sum(-1) / q_sq, 0.0)   # 0 where q = 0
    p.addcmul_(q, centre[..., None], value=-1)                             # p - c q
    return p_norm, q_sq, centre, torch.linalg.vector_norm(p, dim=-1).square()


def _dev_costs(xs, ds, ts, chunk_elems=1 << 17):
    """`dev` costs [B, N-1, N] in O(N B D): the distance of xhat = x_i + h d_i from the line through
    the trajectory's first and last points is |p_i + h q_i|, with p_i, q_i the parts of x_i - x_0
    and d_i orthogonal to the line, a function of h through three numbers per (i, trajectory).
    Written as sqrt(m_i + |q_i|^2 (h + c_i)^2), c_i = p_i.q_i / |q_i|^2 and m_i = |p_i - c_i q_i|^2
    (the squared distance of the line h -> p_i + h q_i from the origin, computed as a vector), both
    terms are non-negative and nothing cancels; the expanded |p|^2 + 2h p.q + h^2 |q|^2 loses ~1e-11
    absolutely (hundreds of times the direct computation's rounding) when the Euler step lands close
    to the line. In blocks of trajectories of about `chunk_elems` numbers (at least one)."""
    n, b = xs.shape[0], xs.shape[1]
    xs, ds = xs.reshape(n, b, -1).transpose(0, 1), ds.reshape(n - 1, b, -1).transpose(0, 1)   # [B, N, D]
    start = xs[:, 0].to(torch.float64)
    direction = xs[:, -1].to(torch.float64) - start
    direction /= direction.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    block = max(1, min(b, chunk_elems // ds[0].numel()))
    work = torch.empty([block, 3, *ds.shape[1:]], dtype=torch.float64, device=xs.device)
    terms = torch.zeros([4, b, n - 1], dtype=torch.float64, device=xs.device)
    for b0 in range(0, b, block):
        b1 = min(b, b0 + block)
        values = _dev_terms(xs[b0:b1, :-1], ds[b0:b1], start[b0:b1], direction[b0:b1], work)
        for out, value in zip(terms[:, b0:b1], values):
            out.copy_(value)
    dev_teacher, q_sq, centre, m = terms                                  # [B, N-1] each
    # The last point lies on the line by construction: its distance is 0.
    dev_teacher = torch.cat([dev_teacher, dev_teacher.new_zeros([b, 1])], dim=1)
    h = ts[None, :] - ts[:-1, None]                                        # [N-1, N]: t_j - t_i
    dist = (m[:, :, None] + q_sq[:, :, None] * (h[None] + centre[:, :, None]).square()).sqrt()
    return dist - dev_teacher[:, None, :]


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
# 4. Teacher runs over the warm-up rounds (shared by every search mode).

class TeacherRound:
    """One warm-up round and its teacher run: points xs [N, B, ...] and denoiser outputs
    dens [N-1, B, ...] at the teacher points (the teacher's own calls, no extra evaluation).
    `first` numbers the round's trajectories globally."""

    def __init__(self, first, denoise, latents, xs, ds, dens):
        self.first, self.denoise, self.latents = first, denoise, latents
        self.xs, self.ds, self.dens = xs, ds, dens

    @property
    def size(self):
        return self.xs.shape[1]


def run_teachers(rounds, t_tea, solver_tea='ipndm'):
    """Teacher runs for every round; returns ([TeacherRound], denoiser calls and evaluations
    (batch rows) on this rank)."""
    data, calls, evals = [], 0, 0
    for first, denoise, latents in rounds:
        with torch.no_grad():
            xs, ds, dens, count = _teacher_run(denoise, latents, t_tea, solver_tea)
        data.append(TeacherRound(first, denoise, latents, xs, ds, dens))
        calls += count
        evals += count * latents.shape[0]
    return data, calls, evals


def _total(value):
    """Sum of a number over all processes."""
    return sum(dist.all_gather_object(value))


def _rmse(x, ref):
    """Per-trajectory RMSE [B] (float64)."""
    diff = (x.to(torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1)
    return diff.square().mean(-1).sqrt().cpu()


def gits_paths(data, t_tea, wanted, metric='dev', coeff=1.15, timing=None):
    """The paper's search: Euler-step cost matrix, averaged over all trajectories in index order,
    then the DP. Returns {num_steps: path}."""
    timing = timing if timing is not None else {}
    t0 = time.perf_counter()
    per_traj = []
    for rnd in data:
        costs = trajectory_costs(rnd.xs, rnd.ds, t_tea, metric)
        per_traj.extend((rnd.first + b, costs[b]) for b in range(costs.shape[0]))
    cost = _gather_in_order(per_traj).mean(0)
    t1 = time.perf_counter()
    paths = dp_all(cost, coeff, max(wanted) - 1)
    timing['cost'] = timing.get('cost', 0.0) + t1 - t0
    timing['dp'] = timing.get('dp', 0.0) + time.perf_counter() - t1
    return {n: paths[n - 1] for n in wanted}


# ----------------------------------------------------------------------------------------------
# 5. Solver-aware search: the DP prices the student's own update.
#
# A step i -> j is priced by running the student solver function itself over a short schedule
# that ends with that step: the candidate path so far (the history), t_j, and a tail of at most
# two teacher points down to the last one (so that schedule-wide choices, DEIS tab's VP map and
# lower_order_final, see a schedule with the right end). The denoiser it gets is teacher-forced:
# at every teacher point up to t_i it returns the teacher's output, in the solver's form (D for
# data prediction, the slope for noise prediction), so the stored history is the teacher's and
# costs no evaluation. The sub-run's own state at t_i drifts from the teacher point (the history
# steps are inexact); every update is x_next = a x + (outputs), so that drift reaches the result
# times a = 1 (noise prediction) or t_j / t_i (data prediction) and is subtracted exactly. The
# step's own extra evaluations (Heun's corrector point, DPM-Solver-2's midpoint, UniPC's
# corrector point) are real, at the drift-corrected point; calls after them (the tail) get a
# dummy, their results are never read. So single-evaluation multistep solvers are priced with no
# network call; Heun, DPM-Solver-2 and UniPC pay one evaluation per trajectory and edge, bounded
# by a coarser candidate grid (`student_grid` points of the teacher grid).

CORRECTOR_SOLVERS = ('unipc',)     # the step i -> j is corrected with an evaluation at t_j


def _form(options):
    return 'x0' if options.get('predict_x0') else 'eps'


def _uses_history(solver):
    """Single-evaluation solvers are multistep (or Euler); the two-evaluation ones are one-step."""
    return solvers.SOLVER_SPECS[solver].evals_per_step == 1


def _extra_evals(solver):
    return solvers.SOLVER_SPECS[solver].evals_per_step - 1 + int(solver in CORRECTOR_SOLVERS)


class _ForcedDenoiser:
    """The teacher-forced denoiser of one priced step i -> j (see the section comment)."""

    def __init__(self, rnd, grid_index, t_tea, i, j, form, extra, state_known):
        self.rnd, self.index, self.i, self.form, self.extra = rnd, grid_index, i, form, extra
        self.t_i = float(t_tea[i])
        self.gamma = 1.0 if form == 'eps' else float(t_tea[j]) / self.t_i
        self.drift = torch.zeros_like(rnd.xs[i]) if state_known else None
        self.evals = 0

    def _as_output(self, x, point, out):
        """What the solver must be given at its state x so that it stores the output `out` of
        the point `point`: D itself, or, for noise prediction, the value giving its slope."""
        return out if self.form == 'x0' else x - (point - out)

    def __call__(self, x, sigma):
        s = float(sigma)
        if self.drift is None:
            k = self.index.get(s)
            if k is None or s < self.t_i:
                return x                        # not a teacher point: unused history detail
            if s == self.t_i:
                self.drift = x - self.rnd.xs[k]
            return self._as_output(x, self.rnd.xs[k], self.rnd.dens[k])
        if self.extra > 0:
            self.extra -= 1
            point = x - self.gamma * self.drift
            self.evals += x.shape[0]
            return self._as_output(x, point, self.rnd.denoise(point, sigma))
        return x


def _head(rnd, subset):
    """The part of a round with global index < subset (None if empty)."""
    take = rnd.size if subset is None else max(0, min(rnd.size, int(subset) - rnd.first))
    if take == rnd.size:
        return rnd
    if take == 0:
        return None
    return TeacherRound(rnd.first, rnd.denoise, rnd.latents[:take], rnd.xs[:, :take], rnd.ds[:, :take],
                        rnd.dens[:, :take])


def candidate_grid(num_tea, points):
    """About `points` evenly spaced indices of the teacher grid, both ends included."""
    stride = max(1, math.ceil((num_tea - 1) / max(int(points) - 1, 1)))
    return sorted(set(range(0, num_tea, stride)) | {num_tea - 1})


def price_step(rnd, t_tea, path, j, solver, options, afs=False):
    """Per-trajectory RMSE [B] of the student's step path[-1] -> j (with path as its history)
    against the teacher point x_j, and the evaluations it spent."""
    end = len(t_tea) - 1
    i = path[-1]
    head = list(path) if _uses_history(solver) else [i]
    tail = [] if j == end else ([(j + end) // 2] if end - j > 1 else []) + [end]
    sub = head + [j] + tail
    sub_afs = bool(afs) and head[0] == 0
    forced = _ForcedDenoiser(rnd, {float(t): k for k, t in enumerate(t_tea)}, t_tea, i, j, _form(options),
                             _extra_evals(solver), state_known=sub_afs and i == 0)
    with torch.no_grad():
        _, inters = solvers.SOLVERS[solver](forced, rnd.xs[head[0]], t_tea[sub], afs=sub_afs,
                                            return_inters=True, **options)
    out = inters[len(head)] - forced.gamma * forced.drift
    return _rmse(out, rnd.xs[j]), forced.evals


def student_dp(data, t_tea, max_steps, solver, options, afs=False, coeff=1.15, grid=21, subset=32, timing=None):
    """Forward DP over (teacher index, steps taken) on the candidate grid; each state keeps its
    best path, which is the history its next step is priced with. Path value = sum_k coeff^k *
    (mean step RMSE), as in the GITS DP. Steps are priced on the warm-up trajectories with global
    index < subset (None: all). Solvers that pay an evaluation per edge get a grid of about
    grid / 2 points. Returns ({num_steps: path}, evaluations, all ranks)."""
    timing = timing if timing is not None else {}
    t0 = time.perf_counter()
    n = len(t_tea)
    end = n - 1
    cand = candidate_grid(n, grid if _extra_evals(solver) == 0 else max(5, grid // 2 + 1))
    data = [r for r in (_head(rnd, subset) for rnd in data) if r is not None]
    layer = {0: (0.0, [0])}
    paths, evals = {}, 0
    for k in range(min(max_steps, len(cand) - 1)):
        last = k == max_steps - 1
        pairs = [(i, j) for i in sorted(layer) for j in cand if j > i and (j == end or not last)]
        if not pairs:
            break
        rows = []
        for rnd in data:
            errs = []
            for i, j in pairs:
                e, spent = price_step(rnd, t_tea, layer[i][1], j, solver, options, afs)
                errs.append(e)
                evals += spent
            errs = torch.stack(errs, 1)                                   # [B, pairs]
            rows.extend((rnd.first + b, errs[b]) for b in range(errs.shape[0]))
        cost = _gather_in_order(rows).mean(0).tolist()
        new = {}
        for (i, j), c in zip(pairs, cost):
            value = layer[i][0] + coeff ** k * c
            if j not in new or value < new[j][0]:
                new[j] = (value, layer[i][1] + [j])
        if end in new:
            paths[k + 2] = new.pop(end)[1]
        layer = new
    timing['student'] = timing.get('student', 0.0) + time.perf_counter() - t0
    return paths, _total(evals)


# ----------------------------------------------------------------------------------------------
# 6. Refinement: move the interior points (in log sigma, order kept) to minimise the student's
# final-point RMSE against the teacher's on (a subset of) the warm-up set, within a budget of
# denoiser evaluations. Pattern search: each interior point in turn moves a fraction of the gap
# towards one neighbour; a move is kept only if the warm-up objective drops, so it never rises;
# the fraction halves after a sweep with no gain. Starts from the best of the given schedules
# (e.g. GITS DP, solver-aware DP, fixed schedules) on the same objective.

FIXED_SCHEDULES = (('polynomial', 7.0), ('logsnr', 1.0), ('time_uniform', 2.0))


def warmup_errors(data, t_steps, solver, options, afs=False, lo=0, hi=None):
    """Per-trajectory RMSE (all processes, in index order) of the student's final point against
    the teacher's, over the warm-up trajectories with global index in [lo, hi); and the
    evaluations spent on this rank."""
    rows, evals = [], 0
    fn = solvers.SOLVERS[solver]
    for rnd in data:
        a = max(0, lo - rnd.first)
        b = rnd.size if hi is None else max(a, min(rnd.size, hi - rnd.first))
        if b <= a:
            continue
        counter = _Counter(rnd.denoise)
        with torch.no_grad():
            x = fn(counter, rnd.latents[a:b] * float(t_steps[0]), t_steps, afs=afs, **options)
        evals += counter.evals
        e = _rmse(x, rnd.xs[-1, a:b])
        rows.extend((rnd.first + a + m, e[m]) for m in range(b - a))
    return _gather_in_order(rows), evals


def warmup_objective(data, t_steps, solver, options, afs=False, subset=None):
    """Mean per-trajectory RMSE of the student's final point against the teacher's over the
    warm-up trajectories with global index < subset (all: None). Returns (value, evaluations
    on this rank)."""
    errors, evals = warmup_errors(data, t_steps, solver, options, afs, 0, subset)
    return float(errors.mean()), evals


class _Counter:
    """Counts denoiser evaluations (batch rows)."""

    def __init__(self, denoise):
        self.denoise, self.evals = denoise, 0

    def __call__(self, x, sigma):
        self.evals += x.shape[0]
        return self.denoise(x, sigma)


def _move(t_steps, k, frac):
    """Point k moved by `frac` of the log-sigma gap to its upper (frac > 0) or lower neighbour."""
    u = t_steps.log()
    gap = (u[k - 1] - u[k]) if frac > 0 else (u[k] - u[k + 1])
    u = u.clone()
    u[k] = u[k] + frac * gap
    out = u.exp()
    out[0], out[-1] = t_steps[0], t_steps[-1]
    return out


def refine_schedule(data, inits, solver, options, afs=False, budget=None, subset=None, min_frac=1 / 64,
                    timing=None):
    """Refine the best of `inits` ({name: t_steps}, equal lengths). The starts are compared on
    the whole warm-up set. The pattern search runs on its first `subset` trajectories (global
    index); the others validate: the result is kept only if it also beats the start on them by more
    than one paired standard error, so neither part's objective, nor the whole warm-up objective,
    ever rises. `budget`: the most
    denoiser evaluations to spend, all processes and stages together (None: no limit). Returns
    (t_steps, info)."""
    timing = timing if timing is not None else {}
    t0 = time.perf_counter()
    total = _total(sum(r.size for r in data))
    used = total if subset is None else max(1, min(int(subset), total))
    held = total - used
    nfe = solvers.count_nfe(solver, len(next(iter(inits.values()))), afs)
    spent, trace = 0, []

    def errors(ts, lo, hi):
        nonlocal spent
        e, evals = warmup_errors(data, ts, solver, options, afs, lo, hi)
        spent += _total(evals)
        return e

    def affordable(n):
        return budget is None or spent + nfe * n <= budget

    starts, start, start_err = {}, None, None
    for name, ts in inits.items():
        if not affordable(total):
            break
        e = errors(ts, 0, total)
        starts[name] = float(e.mean())
        if start is None or starts[name] < starts[start]:
            start, start_err = name, e
    if start is None:
        raise ValueError('--refine_budget: too small to evaluate even one starting schedule')
    best_ts = start_ts = inits[start].clone()
    best = float(start_err[:used].mean())
    trace.append(best)
    frac, direction = 0.5, {}
    while frac >= min_frac and len(best_ts) > 2 and affordable(used + held):
        gained = False
        for k in range(1, len(best_ts) - 1):
            for sign in (direction.get(k, 1), -direction.get(k, 1)):
                if not affordable(used + held):
                    break
                trial = _move(best_ts, k, sign * frac)
                if not bool((trial[1:] < trial[:-1]).all()):
                    continue
                value = float(errors(trial, 0, used).mean())
                if value < best:
                    best, best_ts, gained = value, trial, True
                    direction[k] = sign
                    trace.append(best)
                    break
        if not gained:
            frac /= 2
    final = starts[start]
    if best_ts is not start_ts:
        if held:
            # Keep the search's result only if its gain carries over to the validation
            # trajectories by more than one standard error of the paired per-trajectory
            # difference: a gain within noise is more likely overfitting than improvement.
            check_err = errors(best_ts, used, total)
            diff = (check_err - start_err[used:]).to(torch.float64)
            margin = float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else 0.0
            if float(diff.mean()) + margin < 0:
                final = (best * used + float(check_err.mean()) * held) / total
            else:                          # the gain does not carry over: keep the start
                best_ts = start_ts
        else:
            final = best
    timing['refine'] = timing.get('refine', 0.0) + time.perf_counter() - t0
    info = dict(start=start, start_objectives=starts, objective=final, trace=trace, evals=spent,
                budget=budget, subset=used, moved=best_ts is not start_ts)
    return best_ts, info


def refine_subset(budget, nfe, total, num_inits=5, target_evals=40, minimum=8):
    """Warm-up trajectories for the pattern search: what the budget leaves after the starts and
    the validation, spread over about `target_evals` objective evaluations (at least `minimum`,
    at most half of them: the rest validate)."""
    left = budget - (num_inits + 1) * nfe * total
    return int(min(max(1, total // 2), max(minimum, left // (target_evals * max(nfe, 1)))))


# ----------------------------------------------------------------------------------------------
# 7. The whole search over warm-up rounds.

def _gather_in_order(index_rows):
    """index_rows: list of (global_index, tensor) from this rank. Returns the tensors of all ranks
    stacked in global-index order (so reductions do not depend on the split)."""
    rows = [r for part in dist.all_gather_object([(i, t.cpu()) for i, t in index_rows]) for r in part]
    rows.sort(key=lambda r: r[0])
    return torch.stack([t for _, t in rows])


SEARCH_MODES = ('gits', 'student')


def search_rounds(rounds, *, num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0,
                  solver_tea='ipndm', num_steps_tea=61, metric='dev', coeff=1.15, afs=False, solver=None,
                  model=None, all_num_steps=None, search='gits', refine=False, refine_budget=4.0,
                  student_grid=21, **options):
    """The search over warm-up `rounds`: a list of (first_index, denoise, latents) with latents
    standard normal; first_index numbers the round's trajectories globally (for order-exact
    reduction across processes). search='gits': the paper's Euler-step cost matrix and DP (with
    afs, plus its free step); 'student': the solver-aware DP (with afs, the first step's afs is
    priced, and the path has one more step at the same NFE). refine: then refine the best of
    GITS, solver-aware and fixed schedules on the warm-up set with at most refine_budget times
    the teacher's evaluations. Returns ({num_steps: t_steps}, info)."""
    if search not in SEARCH_MODES:
        raise ValueError(f'--search: unknown mode "{search}"; choose one of {", ".join(SEARCH_MODES)}')
    t_tea = solver_utils.get_schedule(num_steps_tea, sigma_min, sigma_max, schedule_type, schedule_rho, model=model)
    wanted = sorted(set(all_num_steps or [num_steps]))
    if max(wanted) > num_steps_tea:
        raise ValueError(f'--num_steps_tea: {num_steps_tea} is smaller than --num_steps {max(wanted)}')
    solver = solver or 'ipndm'
    options = solvers.resolve_options(solver, options)
    timing = dict(teacher=0.0, cost=0.0, dp=0.0, afs=0.0, student=0.0, refine=0.0)
    t0 = time.perf_counter()
    data, teacher_calls, teacher_evals = run_teachers(rounds, t_tea, solver_tea)
    timing['teacher'] = time.perf_counter() - t0
    total_teacher = _total(teacher_evals)
    extra = int(bool(afs))        # with afs every search returns one more point at the same NFE
    need_gits = search == 'gits' or refine
    need_student = search == 'student' or refine
    gits = gits_paths(data, t_tea, wanted, metric, coeff, timing) if need_gits else {}
    student, student_evals = ({}, 0)
    if need_student:
        student, student_evals = student_dp(data, t_tea, max(wanted) - 1 + extra, solver, options, afs, coeff,
                                            grid=student_grid, timing=timing)
    schedules, chosen, refined = {}, {}, {}
    for n in wanted:
        found = {}
        if n in gits:
            path = gits[n]
            if afs:
                t1 = time.perf_counter()
                _, path = _afs_free_step(data, t_tea, path, solver, options)
                timing['afs'] += time.perf_counter() - t1
            found['gits'] = path
        if n + extra in student:
            found['student'] = student[n + extra]
        mode_path = found.get(search)
        t_steps = t_tea[mode_path].clone() if mode_path is not None else None
        if refine:
            inits = {name: t_tea[p].clone() for name, p in found.items() if len(p) == n + extra}
            for kind, rho in FIXED_SCHEDULES:
                inits[kind] = solver_utils.get_schedule(n + extra, float(t_tea[-1]), float(t_tea[0]), kind, rho)
            budget = int(refine_budget * total_teacher)
            nfe = solvers.count_nfe(solver, n + extra, afs)
            subset = refine_subset(budget, nfe, _total(sum(r.size for r in data)), len(inits))
            t_steps, refined[str(n)] = refine_schedule(data, inits, solver, options, afs, budget, subset,
                                                       timing=timing)
        if t_steps is None:
            raise ValueError(f'--num_steps: no {search} schedule of {n} points on this teacher grid')
        schedules[n] = t_steps
        chosen[n] = found
    info = dict(teacher_grid=[float(t) for t in t_tea],
                indices={str(k): v.get(search) for k, v in chosen.items()},
                paths={str(k): v for k, v in chosen.items()},
                num_warmup=int(_total(sum(r.size for r in data))), teacher_evals_this_rank=teacher_calls,
                evals=dict(teacher=total_teacher, student=student_evals,
                           refine=sum(r['evals'] for r in refined.values())),
                refined=refined, search=search, refine=bool(refine), metric=metric, coeff=coeff,
                solver_tea=solver_tea, num_steps_tea=num_steps_tea, seconds=timing)
    return schedules, info


def _afs_free_step(data, t_tea, path, solver, options):
    """Insert the teacher point between path[0] and path[1] that, with afs on, brings the student's
    output closest to the teacher's final points. No candidate: the schedule stays as it is."""
    candidates = list(range(path[0] + 1, path[1]))
    if not candidates:
        return t_tea[path].clone(), path
    fn = solvers.SOLVERS[solver]
    per_candidate = []
    for m in candidates:
        trial = t_tea[[path[0], m] + path[1:]]
        rows = []
        for rnd in data:
            with torch.no_grad():
                x = fn(rnd.denoise, rnd.latents * float(trial[0]), trial, afs=True, **options)
            x = x.reshape(x.shape[0], -1).to(torch.float64)
            e = (x - rnd.xs[-1].reshape(x.shape[0], -1).to(torch.float64).to(x.device)).square().sum(-1).sqrt().cpu()
            rows.extend((rnd.first + b, e[b]) for b in range(x.shape[0]))
        per_candidate.append(_gather_in_order(rows).mean())
    best = candidates[int(torch.stack(per_candidate).argmin())]
    new_path = [path[0], best] + path[1:]
    return t_tea[new_path].clone(), new_path


def search_schedule(denoise, latents, *, num_steps, sigma_min, sigma_max, schedule_type='polynomial',
                    schedule_rho=7.0, solver_tea='ipndm', num_steps_tea=61, metric='dev', coeff=1.15,
                    afs=False, solver=None, model=None, batch_size=None, **options):
    """The searched t_steps (float64) for `denoise` on the warm-up noise `latents` (standard
    normal, one process). `batch_size` splits the warm-up set into rounds. Also takes
    search=, refine=, refine_budget=, student_grid= (see search_rounds)."""
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
    for flag in ('search', 'refine', 'refine_budget'):
        if not opts.dp and opts.get(flag) not in (None, False):
            raise UserError(f'--{flag}: needs --dp=True (it changes how the schedule is searched)')
    if opts.coeff is None or not opts.coeff > 0:
        raise UserError(f'--coeff: must be positive (got {opts.coeff})')
    if opts.num_warmup is None or opts.num_warmup < 1:
        raise UserError(f'--num_warmup: must be at least 1 (got {opts.num_warmup})')
    if opts.num_steps_tea < opts.num_steps:
        raise UserError(f'--num_steps_tea: must be at least --num_steps ({opts.num_steps}); got {opts.num_steps_tea}')
    if opts.metric not in METRICS:
        raise UserError(f'--metric: must be one of {", ".join(METRICS)}')
    if opts.get('search') is not None and opts.search not in SEARCH_MODES:
        raise UserError(f'--search: must be one of {", ".join(SEARCH_MODES)} (got "{opts.search}")')
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
        # Warm-up seeds are never sampled: a model whose conditioning is tied to the sampled seeds
        # (SD's prompt file: prompt i for seed i) draws it another way for them.
        conditioning = getattr(model, 'warmup_conditioning', model.conditioning)
        denoise = model.bind(**conditioning(batch, labels))
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
            solver=opts.solver, model=model, all_num_steps=all_steps, search=opts.get('search') or 'gits',
            refine=bool(opts.get('refine')), refine_budget=opts.get('refine_budget') or 4.0,
            **opts.solver_options)
    except ValueError as e:
        raise UserError(str(e)) from None
    dist.print0('GITS search: {teacher:.2f}s teacher, {cost:.2f}s cost matrix, {dp:.3f}s DP, {afs:.2f}s afs, '
                '{student:.2f}s solver-aware DP, {refine:.2f}s refinement'.format(**info['seconds']))
    if info['search'] == 'student' or info['refine']:
        dist.print0('Search evaluations: {teacher} teacher, {student} solver-aware DP, {refine} refinement'.format(**info['evals']))
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
        warmup_seed=opts.warmup_seed, search=info['search'], refine=info['refine'],
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
