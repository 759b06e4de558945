"""Beyond the paper: a schedule search that prices the student solver's own steps, and refinement.

The paper's DP (gits.py) prices every step i -> j by one Euler step from the teacher point,
whatever solver will sample. Here:

- search='student' prices each step by the student solver's own update (its order, its history,
  afs, its midpoint or corrector evaluations) against the teacher point (`price_step`,
  `student_dp`), with the same DP recursion;
- refine=True then moves the interior points, in log sigma, to minimise the student's final-point
  error against the teacher on the warm-up set, within a budget of denoiser evaluations
  (`refine_schedule`), starting from the best of the GITS, solver-aware and fixed schedules.

Both reuse the paper's teacher runs (gits.TeacherRound). `search_rounds` and `search_schedule`
take the paper's arguments plus search=, refine=, refine_budget= and student_grid=.
"""

import math
import time

import torch

import gits
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
# 2. Refinement: move the interior points (in log sigma, order kept) to minimise the student's
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
        counter = solver_utils.Recorder(rnd.denoise)
        with torch.no_grad():
            x = fn(counter, rnd.latents[a:b] * float(t_steps[0]), t_steps, afs=afs, **options)
        evals += counter.evals
        e = misc.per_seed_rmse(x, rnd.xs[-1, a:b])
        rows.extend((rnd.first + a + m, e[m]) for m in range(b - a))
    return dist.gather_in_order(rows), evals


def warmup_objective(data, t_steps, solver, options, afs=False, subset=None):
    """Mean per-trajectory RMSE of the student's final point against the teacher's over the
    warm-up trajectories with global index < subset (all: None). Returns (value, evaluations
    on this rank)."""
    errors, evals = warmup_errors(data, t_steps, solver, options, afs, 0, subset)
    return float(errors.mean()), evals


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
    total = dist.sum_over_ranks(sum(r.size for r in data))
    used = total if subset is None else max(1, min(int(subset), total))
    held = total - used
    nfe = solvers.count_nfe(solver, len(next(iter(inits.values()))), afs)
    spent, trace = 0, []

    def errors(ts, lo, hi):
        nonlocal spent
        e, evals = warmup_errors(data, ts, solver, options, afs, lo, hi)
        spent += dist.sum_over_ranks(evals)
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
# 3. The whole search over warm-up rounds.

SEARCH_MODES = ('gits', 'student')


def search_rounds(rounds, *, num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0,
                  solver_tea='ipndm', num_steps_tea=61, metric='dev', coeff=1.15, afs=False, solver=None,
                  model=None, all_num_steps=None, search='gits', refine=False, refine_budget=4.0,
                  student_grid=21, compat=None, denoise_to_zero=False, **options):
    """gits.search_rounds with the solver-aware search and refinement. search='gits': the paper's
    Euler-step cost matrix and DP (with afs, plus its free step); 'student': the solver-aware DP
    (with afs, the first step's afs is priced, and the path has one more step at the same NFE).
    refine: then refine the best of GITS, solver-aware and fixed schedules on the warm-up set
    with at most refine_budget times the teacher's evaluations. Returns ({num_steps: t_steps},
    info). compat and denoise_to_zero go to gits.search_rounds (compat is the paper's search only)."""
    if search not in SEARCH_MODES:
        raise ValueError(f'--search: unknown mode "{search}"; choose one of {", ".join(SEARCH_MODES)}')
    paper = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, schedule_type=schedule_type,
                 schedule_rho=schedule_rho, solver_tea=solver_tea, num_steps_tea=num_steps_tea, metric=metric,
                 coeff=coeff, afs=afs, solver=solver, model=model, all_num_steps=all_num_steps)
    if search == 'gits' and not refine:
        return gits.search_rounds(rounds, **paper, compat=compat, denoise_to_zero=denoise_to_zero, **options)
    if compat is not None:
        flag = '--refine' if refine else '--search'
        raise ValueError(f'{flag}: the solver-aware search and refinement are not in the paper\'s code; '
                         f'drop {flag} or --compat={compat}')
    wanted = sorted(set(all_num_steps or [num_steps]))
    t_tea = gits.teacher_grid(num_steps_tea, sigma_min, sigma_max, schedule_type, schedule_rho, model, wanted)
    solver = solver or 'ipndm'
    options, teacher_options = gits.search_options(solver, solver_tea, options, num_steps_tea=num_steps_tea)
    timing = dict(teacher=0.0, cost=0.0, dp=0.0, afs=0.0, student=0.0, refine=0.0)
    t0 = time.perf_counter()
    data, teacher_calls, teacher_evals = gits.run_teachers(rounds, t_tea, solver_tea, **teacher_options)
    timing['teacher'] = time.perf_counter() - t0
    total_teacher = dist.sum_over_ranks(teacher_evals)
    num_warmup = dist.sum_over_ranks(sum(r.size for r in data))
    extra = int(bool(afs))        # with afs every search returns one more point at the same NFE
    gits_found = gits.gits_paths(data, t_tea, wanted, metric, coeff, timing) if refine or search == 'gits' else {}
    student, student_evals = ({}, 0)
    if search == 'student' or refine:
        student, student_evals = student_dp(data, t_tea, max(wanted) - 1 + extra, solver, options, afs, coeff,
                                            grid=student_grid, timing=timing)
    schedules, chosen, refined, afs_evals = {}, {}, {}, 0
    for n in wanted:
        found = {}
        if n in gits_found:
            path = gits_found[n]
            if afs:
                t1 = time.perf_counter()
                _, path, evals = gits.afs_free_step(data, t_tea, path, solver, options)
                afs_evals += evals
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
            subset = refine_subset(budget, nfe, num_warmup, len(inits))
            t_steps, refined[str(n)] = refine_schedule(data, inits, solver, options, afs, budget, subset,
                                                       timing=timing)
        if t_steps is None:
            raise ValueError(f'--num_steps: no {search} schedule of {n} points on this teacher grid')
        schedules[n] = t_steps
        chosen[n] = found
    info = dict(teacher_grid=[float(t) for t in t_tea],
                indices={str(k): v.get(search) for k, v in chosen.items()},
                paths={str(k): v for k, v in chosen.items()},
                num_warmup=int(num_warmup), teacher_evals_this_rank=teacher_calls,
                evals=dict(teacher=total_teacher, afs=dist.sum_over_ranks(afs_evals), student=student_evals,
                           refine=sum(r['evals'] for r in refined.values())),
                refined=refined, search=search, refine=bool(refine), metric=metric, coeff=coeff,
                solver_tea=solver_tea, num_steps_tea=num_steps_tea, teacher_options=teacher_options, compat=None,
                seconds=timing)
    return schedules, info


def search_schedule(denoise, latents, *, num_steps, batch_size=None, **kw):
    """gits.search_schedule with search=, refine=, refine_budget= and student_grid= (see
    search_rounds)."""
    schedules, _ = search_rounds(gits.warmup_split(denoise, latents, batch_size), num_steps=num_steps, **kw)
    return schedules[num_steps]
