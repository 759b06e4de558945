"""Cost of the GITS search against its teacher run (issue 16, goal 3).

    python benchmarks/search_cost.py                       # the analytic models at sample.py's defaults
    python benchmarks/search_cost.py --datasets=gmm --repeats=5 --metric=l2

The search of `sample.py --dp=True` at its defaults: --num_warmup 256 warm-up seeds (drawn by
`run_schedule.warmup_rounds`, in batches of --batch 64), an iPNDM teacher over 61 polynomial
points, metric dev, coeff 1.15. Each repeat runs, on the same warm-up noise, the teacher alone
(`gits.run_teachers`), the search as `gits.search_rounds` runs it (the teachers with each round's
cost matrices started on a helper thread where a core is idle, `gits.spare_core`;
--overlap=False: none; then `gits.gits_paths`: the wait for the last matrices, their average in
warm-up order, the DP), and the teacher alone again, timed as the mean of its two runs. Reported
per model, medians over --repeats: wall and process CPU seconds of both, the matrices' own time,
and search / teacher alone in wall time (the goal) and in CPU time (the work added, helper
thread included). One thread by default, which leaves the second core of a 2-core machine to the
helper; with more threads than idle cores, OpenMP's barriers make the wall time of small tensor
operations depend on the other load. Writes benchmarks/results/search_cost.json and its markdown
(search_cost.md).
"""

import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib                      # noqa: E402
import gits                        # noqa: E402
import models                      # noqa: E402
import run_schedule                # noqa: E402
import schedules                   # noqa: E402
import solvers                     # noqa: E402
from torch_utils import misc       # noqa: E402
import render                      # noqa: E402


def clocks():
    return time.perf_counter(), time.process_time()


def timed(run):
    w0, c0 = clocks()
    out = run()
    w1, c1 = clocks()
    return out, w1 - w0, c1 - c0


def one_search(model, opts):
    """One repeat: the teacher alone, the search as sample.py runs it (the teacher with the cost
    matrices started beside it, then their wait, average and DP), and the teacher alone again; the
    teacher's time is the mean of its two runs, so that a drift of the machine's speed over the
    repeat cancels. Wall and CPU seconds, and the schedule."""
    rounds = run_schedule.warmup_rounds(model, opts, model.device)
    t_tea = schedules.get_schedule(opts.num_steps_tea, model.sigma_min, model.sigma_max, 'polynomial', 7.0)
    split = {}

    def teacher():
        gits.run_teachers(rounds, t_tea, opts.solver_tea)     # its trajectories are let go at once: held,
        # they would make the next run page-fault fresh memory (measured: 1.5x slower)

    def search():
        data, _, _ = gits.run_teachers(rounds, t_tea, opts.solver_tea, metric=opts.metric,
                                       overlap=None if opts.overlap else False)
        return gits.gits_paths(data, t_tea, [opts.num_steps], opts.metric, opts.coeff, split)

    _, tw0, tc0 = timed(teacher)
    paths, sw, sc = timed(search)
    _, tw1, tc1 = timed(teacher)
    tw, tc = (tw0 + tw1) / 2, (tc0 + tc1) / 2
    return dict(teacher=tw, search=sw, cost=split['cost'], cost_helper=split.get('cost_helper', 0.0), dp=split['dp'],
                teacher_cpu=tc, search_cpu=sc, ratio=sw / tw, ratio_cpu=sc / tc), \
        [float(t) for t in t_tea[paths[opts.num_steps]]]


def measure(name, opts):
    model = models.load(name)
    runs, schedules = zip(*[one_search(model, opts) for _ in range(opts.repeats)])
    if any(s != schedules[0] for s in schedules):
        raise RuntimeError(f'{name}: the searched schedule changed between repeats')
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratios = [r['ratio'] for r in runs]
    res = dict(seconds=med, runs=list(runs), ratio_wall=med['ratio'], ratio_cpu=med['ratio_cpu'],
               ratio_range=[min(ratios), max(ratios)], t_steps=schedules[0])
    teachers = [r['teacher'] for r in runs]
    where = (f'{med["cost_helper"]:.3f}s on the helper thread, {med["cost"]:.3f}s waited for' if med['cost_helper']
             else f'{med["cost"]:.3f}s after the teacher')
    print(f'[{name}] teacher alone {med["teacher"]:.3f}s ({med["teacher_cpu"]:.3f}s CPU; runs '
          f'{min(teachers):.2f}-{max(teachers):.2f}s); search {med["search"]:.3f}s ({med["search_cpu"]:.3f}s CPU): '
          f'cost matrix {where}, DP {med["dp"]:.4f}s; search / teacher: {med["ratio"]:.3f} wall '
          f'(runs {min(ratios):.3f}-{max(ratios):.3f}), {med["ratio_cpu"]:.3f} CPU (median of {opts.repeats})',
          flush=True)
    return res


def markdown(record):
    """{key: (title, body)}: per model, the medians of the repeats, from the JSON record."""
    o = record['options']
    lines = ['| model | teacher alone | cost matrix | DP | search | search / teacher (range) | CPU time ratio |',
             '|---|---|---|---|---|---|---|']
    for name, res in record['results'].items():
        s, (lo, hi) = res['seconds'], res['ratio_range']
        cost = f'{s["cost_helper"]:.3f} s (helper thread)' if s['cost_helper'] else f'{s["cost"]:.3f} s (after)'
        lines.append(f'| {name} | {s["teacher"]:.3f} s | {cost} | {s["dp"]:.4f} s | {s["search"]:.3f} s | '
                     f'{res["ratio_wall"]:.3f} ({lo:.3f}-{hi:.3f}) | {res["ratio_cpu"]:.3f} |')
    title = (f'Search against its teacher alone: {o["num_warmup"]} warm-up seeds in rounds of {o["batch"]}, '
             f'{record["threads"]} thread(s), overlap={o["overlap"]}, medians of {o["repeats"]}')
    return dict(ratios=(title, '\n'.join(lines)))


@click.command()
@click.option('--datasets', default='gmm,gmm_wavelet,digits', show_default=True)
@click.option('--num_warmup', type=click.IntRange(min=1), default=gits.NUM_WARMUP, show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--num_steps', type=click.IntRange(min=2), default=6, show_default=True)
@click.option('--num_steps_tea', type=click.IntRange(min=3), default=gits.NUM_STEPS_TEA, show_default=True)
@click.option('--solver_tea', type=click.Choice(sorted(solvers.SOLVERS)), default=gits.SOLVER_TEA, show_default=True)
@click.option('--metric', type=click.Choice(gits.METRICS), default=gits.METRIC, show_default=True)
@click.option('--coeff', type=click.FloatRange(min=0, min_open=True), default=gits.COEFF, show_default=True)
@click.option('--warmup_seed', type=int, default=gits.WARMUP_SEED, show_default=True)
@click.option('--repeats', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threads', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--overlap', type=bool, default=True, show_default=True,
              help='Start the cost matrices beside the teacher where a core is idle (False: after it)')
@click.option('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'search_cost.json'),
              show_default=True)
def main(datasets, **kw):
    """GITS search time against its teacher run, on the analytic models."""
    opts = dnnlib.EasyDict(kw, class_idx=None)
    if opts.num_steps > opts.num_steps_tea:
        raise dnnlib.util.UserError(f'--num_steps: must be at most --num_steps_tea ({opts.num_steps_tea})')
    names = [n for n in datasets.split(',') if n]
    for n in names:
        if n not in models.REGISTRY:
            raise dnnlib.util.UserError(f'--datasets: unknown model "{n}"; choose from {", ".join(models.REGISTRY)}')
    torch.set_num_threads(opts.threads)
    results = {name: measure(name, opts) for name in names}
    record = dict(options=dict(opts), results=results, torch=torch.__version__, threads=torch.get_num_threads())
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    misc.atomic_write_json(opts.out, record)
    render.write_markdown(opts.out, markdown)
    print(f'Wrote {opts.out} and its markdown (.md)')


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
