"""The rotation schedule (`--search=rotation`; issue 30, item 5): points of equal total rotation
along the warm-up teacher trajectories.

TORS (Zhou et al., arXiv 2603.00763) computes curvature and torsion statistics of projected
sampling trajectories with the Frenet-Serret formulas, cuts the trajectory into segments of equal
total rotation and maps the cut points back to time. Its exact estimator could not be found (only
the abstract and a summary were reachable), so the definition here is derived from
geometry.py, and says so in docs/analysis.md:

1. the teacher runs of the GITS search on the warm-up noise (gits.start_search: no evaluation
   beyond them), every trajectory projected onto its own chord frame in 3-D (the start-end
   direction and the two leading directions of the deviation from it);
2. per trajectory, kappa(s) and tau(s) from a local cubic fit in arc length over WINDOW points,
   and the cumulative rotation of its Frenet frame R_b(i) = int sqrt(kappa^2 + tau^2) ds (radians)
   up to teacher point i;
3. the mean of R_b(i) over the warm-up trajectories, in warm-up-index order (bit-identical
   whatever the batch size or number of processes), normalised to end at 1;
4. the K interior cut points where it crosses k / (num_points - 1), each placed by linear
   interpolation in log sigma within the teacher interval that crosses it; the first and last
   points are the teacher grid's.

Unlike GITS's DP, the points need not lie on the teacher grid; with afs the schedule has one more
point at the same NFE, as every search here does.
"""

import math
import time

import torch

import geometry
import gits
from torch_utils import distributed as dist

WINDOW = 7      # points of the local cubic fit along each teacher trajectory


def trajectory_rotation(xs, window=WINDOW):
    """Cumulative total rotation [B, N] of each teacher trajectory xs [N, B, ...] (radians)."""
    return geometry.trajectory_geometry(xs.flatten(2).to('cpu', torch.float64), window)['rotation']


def mean_rotation(data, window=WINDOW):
    """The cumulative rotation averaged over every warm-up trajectory of every process, in
    warm-up-index order: [N] in radians."""
    rows = []
    for rnd in data:
        rot = trajectory_rotation(rnd.xs, window)
        rows.extend((rnd.first + b, rot[b]) for b in range(rot.shape[0]))
    return dist.gather_in_order(rows).mean(0)


def equal_rotation_points(cumulative, t_tea, num_points):
    """The schedule of `num_points` (float64, decreasing) that cuts the cumulative rotation [N]
    along the teacher grid t_tea [N] into equal parts: first and last points the grid's, interior
    ones interpolated in log sigma inside the interval where the rotation crosses each target."""
    total = float(cumulative[-1])
    if not (math.isfinite(total) and total > 0):
        raise ValueError('--search: the teacher trajectories do not turn (total rotation 0); '
                         'the rotation schedule is undefined here, use --search=gits')
    frac = (cumulative / total).tolist()
    log_t = [math.log(float(t)) for t in t_tea]
    out = [float(t_tea[0])]
    j = 1
    for k in range(1, num_points - 1):
        target = k / (num_points - 1)
        while frac[j] < target:     # the first point at or past the target; its interval has a rise
            j += 1
        w = (target - frac[j - 1]) / (frac[j] - frac[j - 1])
        out.append(math.exp(log_t[j - 1] + w * (log_t[j] - log_t[j - 1])))
    out.append(float(t_tea[-1]))
    return torch.tensor(out, dtype=torch.float64)


def rotation_schedules(data, t_tea, wanted, afs=False, window=WINDOW):
    """{num_points: t_steps} for every num_points in `wanted` (one more point each with afs), and
    the mean cumulative rotation along the teacher grid (radians, for the search's record)."""
    cumulative = mean_rotation(data, window)
    extra = int(bool(afs))
    return {n: equal_rotation_points(cumulative, t_tea, n + extra) for n in wanted}, cumulative


def search_rounds(rounds, paper, compat, **options):
    """student_search.search_rounds with search='rotation' and no refinement (`paper`: its keywords
    for gits.start_search): the teacher runs of the paper's search, then the schedules of equal total
    rotation along them. Its points lie off the teacher grid; the official code (compat) has no such
    search and is refused. With --refine, student_search.search_rounds adds these schedules to the
    refinement's starts instead."""
    if compat is not None:
        raise ValueError(f'--search: the rotation schedule is not in the paper\'s code; drop --search or --compat={compat}')
    timing = dict(teacher=0.0, rotation=0.0)
    base = gits.start_search(rounds, **paper, compat=None, metric=None, timing=timing, **options)
    t0 = time.perf_counter()
    found, cumulative = rotation_schedules(base.data, base.t_tea, base.wanted, paper['afs'])
    timing['rotation'] = time.perf_counter() - t0
    info = dict(teacher_grid=[float(t) for t in base.t_tea], num_warmup=base.num_warmup,
                teacher_evals_this_rank=base.teacher_calls, evals=dict(teacher=base.teacher_evals),
                search='rotation', refine=False, rotation_window=WINDOW,
                mean_rotation=[float(r) for r in cumulative], solver_tea=paper['solver_tea'],
                num_steps_tea=paper['num_steps_tea'], teacher_options=base.teacher_options, compat=None, seconds=timing)
    return found, info
