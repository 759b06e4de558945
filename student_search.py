"""Beyond the paper: a schedule search that prices the student solver's own steps, and refinement.

The paper's DP (gits.py) prices every step i -> j by one Euler step from the teacher point,
whatever solver will sample. Here:

- search='student' prices each step by the student solver's own update (its order, its history,
  afs, its midpoint or corrector evaluations) against the teacher point (`price_step`,
  `student_dp`), with the same DP recursion;
- refine=True then moves the interior points, in log sigma, to minimise the student's final-point
  error against the teacher on the warm-up set (Levenberg-Marquardt, kept only if the teacher runs
  of fresh check seeds confirm the gain), within a budget of denoiser evaluations
  (`refine_schedule`, `refine_found`), starting from the best of the GITS, solver-aware and fixed
  schedules.

Both extend the paper's search (gits.py): `search_rounds` starts with its first stage
(gits.start_search: teacher grid, options, teacher runs), takes its paths (gits.gits_paths, with
afs gits.afs_paths) where a refinement starts from them, and adds its own stages. It and
`search_schedule` take the paper's arguments plus search=, refine=, refine_budget= and student_grid=.
"""

import math
import time

import torch

import gits
import rotation
import schedules
import solver_utils
import solvers
from torch_utils import distributed as dist
from torch_utils import misc

# ----------------------------------------------------------------------------------------------
# 1. Solver-aware search: the DP prices the student's own update.
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
STUDENT_SUBSET = 32                # warm-up trajectories the DP prices its steps on


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
    return gits.TeacherRound(rnd.first, rnd.denoise, rnd.latents[:take], rnd.xs[:, :take], rnd.ds[:, :take],
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
    return misc.per_seed_rmse(out, rnd.xs[j]), forced.evals


def student_dp(data, t_tea, max_steps, solver, options, afs=False, coeff=gits.COEFF, grid=21, subset=STUDENT_SUBSET,
               timing=None):
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
        cost = dist.gather_in_order(rows).mean(0).tolist()
        new = {}
        for (i, j), c in zip(pairs, cost):
            value = layer[i][0] + coeff ** k * c
            if j not in new or value < new[j][0]:
                new[j] = (value, layer[i][1] + [j])
        if end in new:
            paths[k + 2] = new.pop(end)[1]
        layer = new
    timing['student'] = timing.get('student', 0.0) + time.perf_counter() - t0
    return paths, dist.sum_over_ranks(evals)


# ----------------------------------------------------------------------------------------------
# 2. Refinement: move the interior points, in log sigma, to minimise the student's final-point
# error against the teacher's on the warm-up set, within a budget of denoiser evaluations.
#
# The objective is the project's one error measure: the mean over trajectories of the per-seed
# RMSE. It is minimised by Levenberg-Marquardt on iteratively reweighted least squares: the
# residual of a trajectory is its final-point difference r_i (a vector), and weighting |r_i|^2 by
# 1 / |r_i| at the current point makes the least-squares gradient that of the sum of |r_i|. The
# Jacobian of the residuals in the interior log sigmas comes from forward differences on a
# mini-batch of trajectories (a perturbed run replays the base run's calls up to the moved point,
# so point k costs only the evaluations after it); each proposed step is then accepted only if it
# lowers the objective over the whole fit part, so that objective never rises and a mini-batch
# cannot overfit the step. The whole warm-up set is fitted; the check is a second set of
# trajectories that no search and no step has seen (sample.py draws CHECK_PER_WARMUP of them per
# warm-up seed, from the seeds after the warm-up ones; their teacher runs are paid from the
# refinement's budget). The refined schedule is kept only if its gain over its start on the check
# set exceeds one paired standard error; otherwise the start is returned. A check as large as
# the warm-up set halves that standard error against a quarter of the warm-up set (the split an
# earlier version used, which rejected gains that 512 held-out seeds confirmed: the errors are
# heavy-tailed, a few seeds carry the mean). The start is the best of the given schedules (GITS,
# solver-aware DP, fixed ones) on the warm-up trajectories that no search has fitted (the
# solver-aware DP prices its steps on the first STUDENT_SUBSET) and, among those within two
# paired standard errors of the best there (`finalists`), on those and the check set together:
# 224 warm-up trajectories alone picked the worse of two near-tied starts in 2 of 96 benchmark
# cells.

REFINE_BUDGET = 6.0       # default evaluations for the refinement, in teacher runs (one pays the check set)
CHECK_PER_WARMUP = 1      # check trajectories (teacher runs of fresh seeds) per warm-up trajectory
CHECK_FRACTION = 0.25     # search_schedule(latents): the share of the given latents held out as the check
BATCH = 64                # trajectories per Jacobian
FD_STEP = 0.01            # finite-difference step, a fraction of the point's smaller log-sigma gap
MIN_GAP = 1e-3            # smallest log-sigma gap between neighbouring points after a step
FIXED_SCHEDULES = (('polynomial', 7.0), ('logsnr', 1.0), ('time_uniform', 2.0))


class _Replay:
    """A denoiser for a run that shares a prefix with a recorded base run (a
    solver_utils.Recorder with keep=True): a call that repeats one of the base run's bit for bit
    (same noise level, same input) returns the recorded output without evaluating; any other
    evaluates (and counts)."""

    def __init__(self, denoise, base):
        self.denoise, self.base, self.evals = denoise, base, 0

    def __call__(self, x, sigma):
        out = self.base.lookup(x, sigma)
        if out is not None:
            return out.clone()             # the solver may update it in place
        self.evals += x.shape[0]
        return self.denoise(x, sigma)


def _slices(data, lo, hi):
    """(round, a, b): the rows of each round whose global index lies in [lo, hi)."""
    for rnd in data:
        a = max(0, lo - rnd.first)
        b = rnd.size if hi is None else max(a, min(rnd.size, hi - rnd.first))
        if b > a:
            yield rnd, a, b


def _run(denoise, rnd, a, b, t_steps, solver, options, afs, path=False):
    """The student's final points; path=True: all its states [points, rows, ...]."""
    with torch.no_grad():
        out = solvers.SOLVERS[solver](denoise, rnd.latents[a:b] * float(t_steps[0]), t_steps, afs=afs,
                                      return_inters=path, **options)
    return out[1] if path else out


# The path objective (learned coefficients, issue 29): the final point alone is a poor guide where
# the data are discrete (digits): most trajectories end within 1e-4 of the teacher's and a few on
# another training image, and their errors carry the mean but barely move with the parameters (the
# last denoiser snaps them). Which image a trajectory ends on is decided at intermediate noise
# levels, so the path objective also compares the student's state at each interior point t_k
# with the teacher's state there (S4S matches the teacher at every student step), each divided by
# max(t_k, 1): about how much the rest of the flow shrinks an error made at t_k (the map from
# noise level t to the data contracts by about sigma_data / t at high noise). The teacher's state
# between its grid points is the cubic Hermite interpolant of its points and slopes (`teacher_state`).
# The final point alone stays the measure of the check (the benchmark's, the user's).

PATH_WEIGHT = 1.0      # the interior states' weight against the final point's in the path objective


def teacher_state(rnd, t_tea, t, a=0, b=None):
    """The teacher's state at noise level t (rows [a, b) of `rnd`): its grid point where t is one,
    else the cubic Hermite interpolant of the two grid points around t and the teacher's slopes
    dx/dt there (linear in the last interval, which has no slope at its end)."""
    b = rnd.size if b is None else b
    on_grid = (t_tea == t).nonzero()
    if len(on_grid):
        return rnd.xs[int(on_grid[0]), a:b]
    k = min(max(int((t_tea >= t).sum()) - 1, 0), len(t_tea) - 2)      # t_tea[k] > t > t_tea[k + 1]
    t0, t1 = float(t_tea[k]), float(t_tea[k + 1])
    x0, x1 = rnd.xs[k, a:b], rnd.xs[k + 1, a:b]
    h, s = t1 - t0, (t - t0) / (t1 - t0)
    if k + 1 >= rnd.ds.shape[0]:
        return x0 + s * (x1 - x0)
    d0, d1 = rnd.ds[k, a:b], rnd.ds[k + 1, a:b]
    return ((2 * s ** 3 - 3 * s ** 2 + 1) * x0 + (s ** 3 - 2 * s ** 2 + s) * h * d0
            + (3 * s ** 2 - 2 * s ** 3) * x1 + (s ** 3 - s ** 2) * h * d1)


def path_targets(rnd, a, b, t_tea, t_steps):
    """The teacher's states at the interior points of t_steps (rows [a, b))."""
    return [teacher_state(rnd, t_tea, float(t), a, b) for t in t_steps[1:-1]]


def _path_residual(states, final, t_steps, targets):
    """The path objective's residual [rows, ...] of a run (float64, flattened per row) from all its
    states: its final point's difference from `final`, then each interior state's from the
    teacher's (`targets`), weighted."""
    parts = [(states[-1].to(torch.float64) - final.to(torch.float64)).flatten(1)]
    for x, target, t in zip(states[1:-1], targets, t_steps[1:-1]):
        parts.append((x.to(torch.float64) - target.to(torch.float64)).flatten(1) * (PATH_WEIGHT / max(float(t), 1.0)))
    return torch.cat(parts, dim=1)


def warmup_errors(data, t_steps, solver, options, afs=False, path_grid=None):
    """Per-trajectory RMSE (all processes, in index order) of the student's final point against
    the teacher's, over the trajectories of the teacher rounds `data`; and the evaluations spent
    on this rank. path_grid (the teacher grid): the path objective's per-trajectory value instead
    (the norm of the residual, over the square root of the point's size, as the RMSE)."""
    rows, evals = [], 0
    for rnd, a, b in _slices(data, 0, None):
        counter = solver_utils.Recorder(rnd.denoise)
        states = _run(counter, rnd, a, b, t_steps, solver, options, afs, path=path_grid is not None)
        if path_grid is None:
            e = misc.per_seed_rmse(states, rnd.xs[-1, a:b])
        else:
            res = _path_residual(states, rnd.xs[-1, a:b], t_steps, path_targets(rnd, a, b, path_grid, t_steps))
            e = (res.square().mean(-1) * res.shape[1] / rnd.xs[-1, a].numel()).sqrt().cpu()
        evals += counter.evals
        rows.extend((rnd.first + a + m, e[m]) for m in range(b - a))
    return dist.gather_in_order(rows), evals


def _with_interior(t_steps, u):
    """t_steps with its interior points at log sigma `u` (the end points unchanged)."""
    out = t_steps.clone()
    out[1:-1] = u.exp().to(t_steps.dtype)
    return out


# Learned coefficients (issue 29, refine_schedule(coefficients=True)): the fit's parameters are
# the interior log sigmas followed by one offset per weight of the solver's table (predictor, and
# for unipc corrector), relative to the analytic weights at the current schedule and in units of
# the step's own size (the sum of its analytic predictor weights: the step h in noise prediction,
# 1 - t_{i+1}/t_i in data prediction), so that every column has the size of a change of the step
# and offset 0 is the analytic solver; then one log-ratio v_j per evaluated model output, the
# denoiser seeing s_j = t_j exp(v_j) for the output at t_j (solvers: coefficients['sigmas']). A
# weight of step i changes the run only from x_{i+1} on, and v_j only from its own evaluation, so
# a Jacobian column replays the base run up to there (_Replay) and pays only the evaluations after
# it (slot_cost): the last step's weights cost nothing, and the last step's update is linear in them.

FD_STEP_COEFFICIENT = 1e-2    # finite-difference step of an offset (relative to its step's size)
SCHEDULE_SHARE = 0.5          # of the budget left after the starts: the points alone, before the joint fit,
                              # when that share also affords the joint fit a Jacobian and a trial step; when
                              # it does not, the points alone take the whole budget, as the refinement does
REFINE_BUDGET_COEFFICIENTS = 12.0   # the default budget with coefficients: about the refinement's own (6) for the
                              # points alone, as much again for the joint fit (a joint Jacobian costs the
                              # evaluations after every parameter: at 6 the joint fit affords 0-3 steps from
                              # NFE 4 on; benchmarks/results/gits_learned_budget.json, docs/gits.md)
STALL_GAIN = 1e-5             # the points alone and each joint fit stop after 3 steps in a row that gain less than
                              # this (relative): the refinement often crawls on at 1e-7-1e-6 a step, and the joint fits
                              # at NFE 3 at 1e-9, where the rest of the budget serves better or not at all
MAX_LOG_SHIFT = 2.0           # the largest |log(s_j / t_j)| of an evaluation's noise level (a factor of 7.4)
JOINT_FITS = ('final', 'path')   # the joint fits' objectives, raced in this order (path: the path objective, given
                              # refine_schedule's teacher_grid)
RACE_SHARE = 0.5              # of the budget left after the points alone: the joint fits race with equal shares of
                              # it, then the one the check prefers goes on with the rest (neither objective wins
                              # everywhere, and an even split starves the one that does)
RACE_STEPS = 2                # ... but each fit's share affords this many of its steps where an equal split of all
                              # that is left does (at NFE 8 and 10 a share of half affords few)
COEFFICIENT_BATCH = 128       # trajectories per Jacobian of either joint fit (the trial steps use all of them):
                              # 64 gave noisier steps, 256 affords half as many


def default_refine_budget(coefficients=False):
    """--refine_budget's default, in teacher runs: larger when the refinement also fits coefficients."""
    return REFINE_BUDGET_COEFFICIENTS if coefficients else REFINE_BUDGET


def coefficient_slots(analytic, afs=False):
    """(part, step, k) of every weight of an analytic `coefficients` table, in parameter order,
    then ('sigmas', j, 0) for every model output that is evaluated (its noise level's shift)."""
    weights = [(part, i, k) for part in ('predictor', 'corrector') for i, row in enumerate(analytic.get(part) or [])
               if row is not None for k in range(len(row))]
    outputs = solvers.output_count(analytic['predictor'], analytic.get('corrector'))
    return weights + [('sigmas', j, 0) for j in range(int(bool(afs)), outputs)]


def slot_cost(slot, nfe, afs=False):
    """Evaluations a trajectory pays for a Jacobian column of `slot`: those from the first one it
    changes on (the run replays the rest). A weight of step i changes x_{i+1} (counted from its
    step: one more than it needs without afs); a noise level, its own evaluation."""
    part, j, _ = slot
    return nfe - j + int(bool(afs)) if part == 'sigmas' else nfe - j


def learned_coefficients(solver, t_steps, options, offsets, afs=False):
    """The `coefficients` table at t_steps: the analytic weights plus offsets times the step sizes,
    and every evaluated output's noise level t_j times exp(its offset)."""
    analytic = solvers.analytic_coefficients(solver, t_steps, **options)
    sizes = [sum(row) for row in analytic['predictor']]
    out = {part: [None if row is None else list(row) for row in rows] for part, rows in analytic.items()}
    outputs = solvers.output_count(analytic['predictor'], analytic.get('corrector'))
    out['sigmas'] = [float(t) for t in t_steps[:outputs]]
    for (part, i, k), value in zip(coefficient_slots(analytic, afs), offsets.tolist()):
        if part == 'sigmas':
            out['sigmas'][i] *= math.exp(value)
        else:
            out[part][i][k] += sizes[i] * value
    return out


def _with_coefficients(options, solver, t_steps, offsets, afs=False):
    """The solver options of a run at (t_steps, offsets); offsets None: the analytic solver."""
    if offsets is None:
        return options
    return dict(options, coefficients=learned_coefficients(solver, t_steps, options, offsets, afs))


def _ordered(t_steps):
    """Strictly decreasing, with at least MIN_GAP between neighbours in log sigma."""
    return bool((t_steps[:-1].log() - t_steps[1:].log() >= MIN_GAP).all())


def _irls_terms(block):
    """One trajectory's terms of the normal equations, [P * P + P]: J^T J / |r| (flattened) and
    J^T r / |r|, from its block [D, P + 1] = [Jacobian J | residual r] (float64), as one matrix
    product on one thread: its rounding then depends only on the block's shape, so the terms of
    a trajectory are the same bits however the trajectories are split over rounds and processes
    (a batched product's rounding depends on the batch: a kept refinement then differed between 1
    and 2 processes in the last digits; a multithreaded one's on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gram = block.T @ block                                         # [P + 1, P + 1]
    finally:
        torch.set_num_threads(threads)
    p = block.shape[1] - 1
    weight = 1 / gram[p, p].sqrt().clamp_min(1e-30)                    # 1 / |r|
    return torch.cat([gram[:p, :p].flatten(), gram[:p, p]]) * weight


def _normal_equations(data, t_steps, solver, options, afs, lo, hi, offsets=None, path_grid=None):
    """IRLS normal equations (A, g) of the residuals on trajectories [lo, hi) at t_steps, summed
    over trajectories in global-index order (so independent of batches and processes); and the
    evaluations spent on this rank. A = sum J_i^T J_i / |r_i|, g = sum J_i^T r_i / |r_i|, with
    J_i the forward-difference Jacobian of r_i in the interior log sigmas (and, with `offsets`,
    in the coefficient offsets after them). r_i: the final point's difference from the teacher's;
    path_grid (the teacher grid): the path objective's residual."""
    u = t_steps[1:-1].log().to(torch.float64)
    gaps = torch.minimum(t_steps[:-2].log() - u, u - t_steps[2:].log()).to(torch.float64)
    steps = FD_STEP * gaps
    rows, evals = [], 0
    for rnd, a, b in _slices(data, lo, hi):
        tape = solver_utils.Recorder(rnd.denoise, keep=True)
        final = rnd.xs[-1, a:b]
        targets = path_targets(rnd, a, b, path_grid, t_steps) if path_grid is not None else None

        def value(states, ts, moved_targets):
            if targets is None:
                return states.to(torch.float64).flatten(1)
            return _path_residual(states, final, ts, moved_targets)
        base = value(_run(tape, rnd, a, b, t_steps, solver, _with_coefficients(options, solver, t_steps, offsets, afs),
                          afs, path=targets is not None), t_steps, targets)
        evals += tape.evals
        columns = []

        def column(ts, opts, step, moved_targets=targets):
            nonlocal evals
            replay = _Replay(rnd.denoise, tape)
            states = _run(replay, rnd, a, b, ts, solver, opts, afs, path=targets is not None)
            evals += replay.evals
            columns.append((value(states, ts, moved_targets) - base) / step)
        for k in range(len(u)):
            moved = u.clone()
            moved[k] += steps[k]
            moved_ts = _with_interior(t_steps, moved)
            moved_targets = None if targets is None else [
                teacher_state(rnd, path_grid, float(moved_ts[k + 1]), a, b) if m == k else target
                for m, target in enumerate(targets)]
            column(moved_ts, _with_coefficients(options, solver, moved_ts, offsets, afs), steps[k], moved_targets)
        for k in range(0 if offsets is None else len(offsets)):
            moved = offsets.clone()
            moved[k] += FD_STEP_COEFFICIENT
            column(t_steps, _with_coefficients(options, solver, t_steps, moved, afs), FD_STEP_COEFFICIENT)
        res = base - final.to(torch.float64).flatten(1) if targets is None else base      # [rows, D]
        rows.extend((rnd.first + a + m, _irls_terms(torch.stack([c[m] for c in columns] + [res[m]], dim=1)))
                    for m in range(b - a))
    total = dist.gather_in_order(rows).sum(0)
    p = len(u) + (0 if offsets is None else len(offsets))
    return total[:p * p].reshape(p, p), total[p * p:], evals


def _lm_step(t_steps, A, g, damping, offsets=None, shifts=None):
    """The Levenberg-Marquardt step from t_steps (and the coefficient offsets, if any), shortened
    until the points stay ordered and the offsets marked by `shifts` (the noise levels' log-ratios)
    within MAX_LOG_SHIFT: the new t_steps, or (t_steps, offsets) with offsets; None if no shortened
    step does."""
    u = t_steps[1:-1].log().to(torch.float64)
    scale = A.diagonal().clamp_min(1e-12 * float(A.diagonal().max().clamp_min(1e-30)))
    delta = -torch.linalg.solve(A + damping * torch.diag(scale), g)
    for _ in range(20):
        trial = _with_interior(t_steps, u + delta[:len(u)])
        moved = None if offsets is None else offsets + delta[len(u):]
        if _ordered(trial) and (moved is None or shifts is None or bool((moved[shifts].abs() <= MAX_LOG_SHIFT).all())):
            return trial if offsets is None else (trial, moved)
        delta = delta / 2
    return None


def _paired(a, b):
    """Mean and standard error (inf for one trajectory) of the per-trajectory difference a - b."""
    diff = (a - b).to(torch.float64)
    return float(diff.mean()), float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else math.inf


def check_verdict(start_errors, refined_errors):
    """Keep a refinement only if its mean per-trajectory gain over the start on the check
    trajectories exceeds one standard error of the paired difference: a gain within noise is more
    likely overfitting than improvement. Returns (kept, gain, standard error)."""
    gain, se = _paired(start_errors, refined_errors)
    return gain > se, gain, se


def finalists(errors, width=2.0):
    """The names among {name: per-trajectory errors} (the same trajectories) whose mean is within
    `width` paired standard errors of the lowest mean, best first."""
    best = min(errors, key=lambda k: float(errors[k].mean()))
    out = []
    for name, e in errors.items():
        diff, se = _paired(e, errors[best])
        if diff <= width * se:
            out.append(name)
    return sorted(out, key=lambda k: float(errors[k].mean()))


def refine_schedule(data, check, inits, solver, options, afs=False, budget=None, timing=None, exclude=0, batch=None,
                    max_steps=100, coefficients=False, teacher_grid=None):
    """Refine the best of `inits` ({name: t_steps}, equal lengths): the starts are compared on the
    warm-up trajectories `data` with global index >= exclude (those no search fitted) together with
    the teacher rounds `check`, then Levenberg-Marquardt steps (see above) fit all of `data`, and
    `check` (trajectories no step has seen) decides whether the result is kept. `budget`: the most
    denoiser evaluations to spend, all processes and stages together (None: no limit); a step is
    only started if the budget also affords the check. coefficients=True (multistep solvers): the
    points alone are fitted first (as the refinement does, with SCHEDULE_SHARE of the budget, until
    they stall), then the solver's weights and evaluation noise levels together with the points
    (offsets from the analytic solver, see learned_coefficients; `batch` is then the joint fit's,
    default COEFFICIENT_BATCH): from the points-alone result, on the final point's error and, given
    `teacher_grid` (the teacher's), on the path objective (JOINT_FITS). The two race with a share of
    the budget left each (RACE_SHARE, RACE_STEPS), the one with the lower check error resumes with
    the rest, and the check judges the best of what it measured (each fit where the race paused it,
    the leader where it stopped). info['coefficients'] holds the kept table (None when the check
    rejects the result: the start is returned, with the analytic weights; or when no joint step was
    accepted), info['objective'] the objective of its fit and info['stage'] whether it is the race's
    state ('race') or the resumed one ('resumed'). Returns (t_steps, info)."""
    timing = timing if timing is not None else {}
    t0 = time.perf_counter()
    batch = batch or (COEFFICIENT_BATCH if coefficients else BATCH)
    total = dist.sum_over_ranks(sum(r.size for r in data))
    check_size = dist.sum_over_ranks(sum(r.size for r in check))
    compared_from = exclude if exclude < total else 0
    points = len(next(iter(inits.values())))
    nfe = solvers.count_nfe(solver, points, afs)
    spent = 0

    def affordable(evals, limit=budget):
        return limit is None or spent + evals <= limit

    def errors(ts, rounds, offsets=None, path_grid=None):
        nonlocal spent
        e, evals = warmup_errors(rounds, ts, solver, _with_coefficients(options, solver, ts, offsets, afs), afs,
                                 path_grid)
        spent += dist.sum_over_ranks(evals)
        return e

    start_errors = {}
    for name, ts in inits.items():
        if not affordable(nfe * total):
            break
        start_errors[name] = errors(ts, data)
    if not start_errors:
        raise ValueError(f'--refine_budget: {budget} evaluations cannot compare even one starting schedule '
                         f'({nfe * total} needed); raise --refine_budget')
    objectives = {name: float(e[compared_from:].mean()) for name, e in start_errors.items()}
    # The starts within noise of the best are compared again with the check set's trajectories too.
    start_check, finals = {}, {}
    for name in finalists({name: e[compared_from:] for name, e in start_errors.items()}):
        if not affordable(nfe * check_size):
            break
        start_check[name] = errors(inits[name], check)
        finals[name] = float(torch.cat([start_errors[name][compared_from:], start_check[name]]).mean())
    start = min(finals or objectives, key=(finals or objectives).get)
    t_steps = inits[start].clone()
    value = float(start_errors[start].mean())
    # The result (and the start) on the check set; with coefficients also the points-alone result
    # and every joint fit.
    fits = tuple(fit for fit in JOINT_FITS if fit != 'path' or teacher_grid is not None)
    check_cost = nfe * check_size * (int(start not in start_check) + (2 + len(fits) if coefficients else 1))
    trace = []

    def descend(fit, batch, jacobian_cost, limit, stall=0.0, path_grid=None, shifts=None):
        """Levenberg-Marquardt steps on `fit` (a dict: t_steps, offsets (None: the points alone), value,
        damping, cursor (the next Jacobian's first trajectory), steps (accepted), stalled), updated in
        place so that a paused fit resumes where it stopped, while `limit` affords a Jacobian and a
        trial step and keeps the check affordable; a step counts as progress if it gains more than
        `stall` (relative), and three in a row without progress end it (fit['stalled']). `shifts`:
        the offsets that are noise-level log-ratios (bounded by MAX_LOG_SHIFT). Returns `fit`."""
        nonlocal spent
        failures = 0
        while points > 2 and check_size > 0 and len(trace) < max_steps and failures < 3:
            lo = fit['cursor'] % total
            hi = min(total, lo + batch)
            if not affordable(jacobian_cost * (hi - lo) + nfe * total + check_cost, limit):
                break
            fit['cursor'] = hi
            A, g, evals = _normal_equations(data, fit['t_steps'], solver, options, afs, lo, hi, fit['offsets'],
                                            path_grid)
            spent += dist.sum_over_ranks(evals)
            accepted = False
            while affordable(nfe * total + check_cost, limit):
                trial = _lm_step(fit['t_steps'], A, g, fit['damping'], fit['offsets'], shifts)
                if trial is None:
                    fit['damping'] *= 10
                    break
                trial_ts, trial_offsets = (trial, None) if fit['offsets'] is None else trial
                trial_value = float(errors(trial_ts, data, trial_offsets, path_grid).mean())
                if trial_value < fit['value']:
                    trace.append((fit['value'], trial_value))
                    fit.update(t_steps=trial_ts, offsets=trial_offsets, value=trial_value, steps=fit['steps'] + 1,
                               damping=max(fit['damping'] / 3, 1e-6))
                    accepted = True
                    break
                fit['damping'] *= 10
                if fit['damping'] > 1e4:
                    break
            progress = accepted and trace[-1][0] - trace[-1][1] > stall * trace[-1][0]
            failures = 0 if progress else failures + 1
        fit['stalled'] = failures >= 3
        return fit

    def begin(t_steps, offsets, value):
        return dict(t_steps=t_steps, offsets=offsets, value=value, damping=1e-2, cursor=0, steps=0, stalled=False)

    joint = {}            # objective: its fit (see descend) from the points-alone result
    snapshots = {}        # (objective, 'race' or 'resumed'): (t_steps, offsets, check errors) of a joint fit
    if not coefficients:
        t_steps = descend(begin(t_steps, None, value), batch, nfe * (points - 1), budget)['t_steps']
    else:                 # the points alone first (cheap steps), then points and weights together
        slots = coefficient_slots(solvers.analytic_coefficients(solver, t_steps, **options), afs)
        shifts = torch.tensor([slot[0] == 'sigmas' for slot in slots])
        joint_cost = nfe * (points - 1) + sum(slot_cost(slot, nfe, afs) for slot in slots)
        first = None if budget is None else spent + int(SCHEDULE_SHARE * (budget - spent))
        joint_round = joint_cost * min(batch, total) + nfe * total     # a joint Jacobian and a trial step
        joint_step = joint_round + check_cost                          # ... keeping every check affordable
        if budget is not None and budget - first < joint_step:
            first = budget               # no joint step affordable after a shared first stage
        first_stage = descend(begin(t_steps, None, value), BATCH, nfe * (points - 1), first, STALL_GAIN)
        t_steps, value, alone_steps = first_stage['t_steps'], first_stage['value'], first_stage['steps']
        zero = torch.zeros(len(slots), dtype=torch.float64)

        def snapshot(fit):
            nonlocal check_cost
            check_cost -= nfe * check_size            # the check paid now was set aside for it
            return fit['t_steps'], fit['offsets'], errors(fit['t_steps'], check, fit['offsets'])

        def resume(objective, limit):
            return descend(joint[objective], batch, joint_cost, limit, STALL_GAIN,
                           teacher_grid if objective == 'path' else None, shifts)

        # The race: each fit from the points-alone result with an equal share of RACE_SHARE of what is
        # left (what one leaves goes to the next), but no less than RACE_STEPS of its own steps where an
        # equal split of all that is left affords them (at high NFE a share affords few).
        race_share = None if budget is None else int(RACE_SHARE * (budget - spent)) // len(fits)
        floor = RACE_STEPS * joint_round
        for k, objective in enumerate(fits):
            limit = None if budget is None else spent + min((budget - spent) // (len(fits) - k), max(race_share, floor))
            if objective == 'path':      # the path objective's value at the start, then at least a step
                if not affordable(nfe * total + joint_step, limit):
                    continue
                start_value = float(errors(t_steps, data, zero, teacher_grid).mean())
            else:
                start_value = value
            joint[objective] = begin(t_steps, zero, start_value)
            if resume(objective, limit)['steps']:
                snapshots[objective, 'race'] = snapshot(joint[objective])
        # The check's better fit resumes with the rest of the budget, unless it stalled.
        raced = {objective: fit['steps'] for objective, fit in joint.items()}
        leader = min(snapshots, key=lambda key: float(snapshots[key][2].mean()), default=(None,))[0]
        if leader is not None and not joint[leader]['stalled'] and resume(leader, budget)['steps'] > raced[leader]:
            snapshots[leader, 'resumed'] = snapshot(joint[leader])
    # The check decides stage by stage: the points alone must beat the start, and the better joint fit
    # on the check (learned weights with their points) what the points alone kept; a joint fit the
    # check does not confirm falls back to the points-alone result, never below it.
    verdict, kept, alone_verdict, chosen = None, False, None, None
    result, result_offsets = inits[start], None
    if trace:
        if start not in start_check:
            start_check[start] = errors(inits[start], check)
        base_check = start_check[start]
        alone = t_steps if coefficients and alone_steps else None
        if snapshots and alone is not None:
            alone_check = errors(alone, check)
            alone_kept, gain, se = check_verdict(base_check, alone_check)
            alone_verdict = dict(start=float(base_check.mean()), refined=float(alone_check.mean()), gain=gain, se=se,
                                 kept=alone_kept)
            if alone_kept:
                result, base_check = alone, alone_check
        # Every joint fit where the race paused it, and the leader where it stopped: the lowest check
        # error is judged (a resumed fit that the check finds worse keeps its race state).
        candidates = snapshots or {(None, None): (t_steps, None, errors(t_steps, check))}
        chosen = min(candidates, key=lambda key: float(candidates[key][2].mean()))
        final_kept, gain, se = check_verdict(base_check, candidates[chosen][2])
        verdict = dict(size=check_size, start=float(base_check.mean()), refined=float(candidates[chosen][2].mean()),
                       gain=gain, se=se)
        if final_kept:
            result, result_offsets, _ = candidates[chosen]
        kept = result is not inits[start]
    t_steps = result.clone()
    timing['refine'] = timing.get('refine', 0.0) + time.perf_counter() - t0
    info = dict(start=start, start_objectives=objectives, finalists=finals, steps=len(trace), trace=trace,
                check=verdict, kept=kept, evals=spent, budget=budget, fit=total, compared_from=compared_from)
    if coefficients:
        learned = result_offsets is not None
        objective, stage = chosen if learned else (None, None)
        info.update(coefficients=learned_coefficients(solver, t_steps, options, result_offsets, afs) if learned else None,
                    objective=objective, stage=stage, check_points_alone=alone_verdict,
                    offsets=snapshots[chosen][1].tolist() if chosen in snapshots else None,
                    joint_steps=sum(fit['steps'] for fit in joint.values()),
                    fits={name: dict(steps=joint[name]['steps'], continued=joint[name]['steps'] - raced[name],
                                     race_check=float(snapshots[name, 'race'][2].mean()),
                                     check=float(snapshots.get((name, 'resumed'), snapshots[name, 'race'])[2].mean()))
                          for name, when in snapshots if when == 'race'})
    return t_steps, info


def refine_found(data, check, t_tea, found, points, solver, options, afs=False, budget=None, timing=None,
                 coefficients=False, starts=None):
    """Refine from the searched paths `found` ({name: indices into t_tea}, those of `points`
    points), the fixed schedules and `starts` ({name: t_steps} off the grid, e.g. the rotation
    schedule). The starts are compared on the trajectories the solver-aware DP did not price (if it
    is among them). Returns (inits, t_steps, info)."""
    inits = {name: t_tea[path].clone() for name, path in found.items() if len(path) == points}
    for kind, rho in FIXED_SCHEDULES:
        inits[kind] = schedules.get_schedule(points, float(t_tea[-1]), float(t_tea[0]), kind, rho)
    inits.update({name: ts for name, ts in (starts or {}).items() if len(ts) == points})
    exclude = STUDENT_SUBSET if 'student' in inits else 0
    t_steps, info = refine_schedule(data, check, inits, solver, options, afs, budget, timing, exclude=exclude,
                                    coefficients=coefficients, teacher_grid=t_tea)
    return inits, t_steps, info



# ----------------------------------------------------------------------------------------------
# 3. The whole search over warm-up rounds.

SEARCH_MODES = ('gits', 'student', 'rotation')     # rotation: rotation.py


def schedule_budget(refine_budget, teacher_evals, check_evals, count):
    """Each of `count` refined schedules' evaluations: refine_budget teacher runs, less the check
    set's teacher run, shared evenly (the searches before the refinement are reported, not
    charged: the afs free step alone can cost most of a teacher run)."""
    return (int(refine_budget * teacher_evals) - check_evals) // count


def refinement_check(check_rounds, t_tea, solver_tea, teacher_options, teacher_evals, num_warmup, budget, timing):
    """The teacher runs of the refinement's check set: (rounds, trajectories and evaluations, all
    processes), refused before they start if they would not leave the refinement any of its
    `budget`."""
    num_check = dist.sum_over_ranks(sum(len(noise) for _, _, noise in check_rounds))
    if num_check == 0:
        raise ValueError('--refine: the refinement needs check trajectories besides the warm-up ones')
    needed = teacher_evals * num_check // max(1, num_warmup)     # the teacher's evaluations are per trajectory
    if needed >= budget:
        raise ValueError(f'--refine_budget: {budget} evaluations do not cover the teacher runs of the '
                         f'refinement\'s {num_check} check trajectories ({needed}); raise --refine_budget')
    t0 = time.perf_counter()
    check, _, evals = gits.run_teachers(check_rounds, t_tea, solver_tea, **teacher_options)
    timing['check'] = timing.get('check', 0.0) + time.perf_counter() - t0
    return check, num_check, dist.sum_over_ranks(evals)


def search_rounds(rounds, *, num_steps, check_rounds=(), sigma_min, sigma_max, schedule_type='polynomial',
                  schedule_rho=7.0, solver_tea=gits.SOLVER_TEA, num_steps_tea=gits.NUM_STEPS_TEA, metric=gits.METRIC, coeff=gits.COEFF, afs=False,
                  solver=None, model=None, all_num_steps=None, search='gits', refine=False, refine_budget=None,
                  student_grid=21, compat=None, denoise_to_zero=False, refine_coefficients=False, **options):
    """gits.search_rounds with the solver-aware search and refinement. search='gits': the paper's
    Euler-step cost matrix and DP (with afs, plus its free step); 'student': the solver-aware DP
    (with afs, the first step's afs is priced, and the path has one more step at the same NFE).
    refine: then refine the best of GITS, solver-aware and fixed schedules on the warm-up set
    with at most refine_budget times the teacher's evaluations (None: default_refine_budget; the
    one used is info['refine_budget']), and keep each result only if the teacher runs of
    `check_rounds` (this rank's (first, denoise, noise) of the check seeds, indexed from 0) confirm
    it; their teacher evaluations come out of that budget. Returns ({num_steps: t_steps}, info).
    compat and denoise_to_zero go to gits.search_rounds (compat is the paper's search only).
    refine_coefficients: the refinement also fits the solver's weights and evaluation noise levels
    (a multistep solver's; info['refined'][n]['coefficients'] holds those kept, None if rejected)."""
    if search not in SEARCH_MODES:
        raise ValueError(f'--search: unknown mode "{search}"; choose one of {", ".join(SEARCH_MODES)}')
    paper = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule_type=schedule_type,
                 schedule_rho=schedule_rho, solver_tea=solver_tea, num_steps_tea=num_steps_tea, afs=afs, solver=solver,
                 model=model, all_num_steps=all_num_steps)
    if refine_coefficients and not refine:
        raise ValueError('--refine_coefficients: needs --refine=True (the coefficients are fitted by the refinement)')
    if refine_coefficients and solver is not None and solver not in solvers.MULTISTEP:
        raise ValueError(f'--refine_coefficients: only the multistep solvers have coefficients to learn: '
                         f'{", ".join(solvers.MULTISTEP)}')
    if search == 'gits' and not refine:
        return gits.search_rounds(rounds, **paper, metric=metric, coeff=coeff, compat=compat,
                                  denoise_to_zero=denoise_to_zero, **options)
    if search == 'rotation' and not refine:
        return rotation.search_rounds(rounds, paper, compat, **options)
    if compat is not None:
        flag = '--refine_coefficients' if refine_coefficients else '--refine' if refine else '--search'
        raise ValueError(f'{flag}: the solver-aware search and refinement are not in the paper\'s code; '
                         f'drop {flag} or --compat={compat}')
    refine_budget = refine_budget or default_refine_budget(refine_coefficients)
    # The paper's teacher runs (their cost matrices wanted only for the GITS schedule a refinement starts from).
    timing = dict(teacher=0.0, cost=0.0, dp=0.0, afs=0.0, student=0.0, check=0.0, refine=0.0)
    base = gits.start_search(rounds, **paper, compat=None, metric=metric if refine else None, timing=timing, **options)
    t_tea, wanted, solver, options, data = base.t_tea, base.wanted, base.solver, base.options, base.data
    extra = int(bool(afs))        # with afs every search returns one more point at the same NFE
    budget, check, num_check, check_evals = None, [], 0, 0
    if refine:
        check, num_check, check_evals = refinement_check(check_rounds, t_tea, solver_tea, base.teacher_options,
                                                         base.teacher_evals, base.num_warmup,
                                                         int(refine_budget * base.teacher_evals), timing)
        budget = schedule_budget(refine_budget, base.teacher_evals, check_evals, len(wanted))
    gits_found, afs_evals = {}, 0
    if refine or search == 'gits':        # the paper's paths, with afs their free step
        gits_found = gits.gits_paths(data, t_tea, wanted, metric, coeff, timing)
        if afs:
            gits_found, afs_evals = gits.afs_paths(base, gits_found, schedule_type, solver_tea)
    student, student_evals = ({}, 0)
    if search == 'student' or refine:
        student, student_evals = student_dp(data, t_tea, max(wanted) - 1 + extra, solver, options, afs, coeff,
                                            grid=student_grid, timing=timing)
    # The rotation schedules (off the teacher grid) join the refinement's starts.
    rotated = rotation.rotation_schedules(data, t_tea, wanted, afs)[0] if search == 'rotation' else {}
    chosen = {}
    for n in wanted:
        found = {'gits': gits_found[n]} if n in gits_found else {}
        if n + extra in student:
            found['student'] = student[n + extra]
        chosen[n] = found
    schedules, refined = {}, {}
    for n, found in chosen.items():
        path = found.get(search)
        t_steps = t_tea[path].clone() if path is not None else None
        if refine:
            _, t_steps, refined[str(n)] = refine_found(data, check, t_tea, found, n + extra, solver, options, afs,
                                                       budget, timing, coefficients=refine_coefficients,
                                                       starts={'rotation': rotated[n]} if n in rotated else None)
        if t_steps is None:
            raise ValueError(f'--num_steps: no {search} schedule of {n} points on this teacher grid')
        schedules[n] = t_steps
    info = dict(teacher_grid=[float(t) for t in t_tea],
                indices={str(k): v.get(search) for k, v in chosen.items()},
                paths={str(k): v for k, v in chosen.items()},
                num_warmup=base.num_warmup, teacher_evals_this_rank=base.teacher_calls,
                evals=dict(teacher=base.teacher_evals, afs=afs_evals, student=student_evals, check=check_evals,
                           refine=sum(r['evals'] for r in refined.values())),
                num_check=num_check,
                refined=refined, search=search, refine=bool(refine), refine_budget=refine_budget if refine else None,
                metric=metric, coeff=coeff,
                solver_tea=solver_tea, num_steps_tea=num_steps_tea, teacher_options=base.teacher_options, compat=None,
                seconds=timing)
    return schedules, info


def search_schedule(denoise, latents, *, num_steps, batch_size=None, **kw):
    """gits.search_schedule with search=, refine=, refine_budget= and student_grid= (see
    search_rounds). With refine, the last CHECK_FRACTION of `latents` are the check set and the
    rest the warm-up set of every search."""
    check = []
    if kw.get('refine'):
        held = max(1, round(len(latents) * CHECK_FRACTION))
        latents, check = latents[:-held], gits.warmup_split(denoise, latents[-held:], batch_size)
    schedules, _ = search_rounds(gits.warmup_split(denoise, latents, batch_size), num_steps=num_steps,
                                 check_rounds=check, **kw)
    return schedules[num_steps]
