"""Cost of the GITS search against its teacher run (issue 16, goal 3).

    python benchmarks/search_cost.py                       # the analytic models at sample.py's defaults
    python benchmarks/search_cost.py --datasets=gmm --repeats=5 --metric=l2

The search of `sample.py --dp=True` at its defaults: --num_warmup 256 warm-up seeds (drawn by
`run_schedule.warmup_rounds`, in batches of --batch 64), an iPNDM teacher over 61 polynomial points, metric
dev, coeff 1.15. `gits.search_rounds` runs two stages for it, timed here one by one: the teacher
run (`gits.run_teachers`) and the paper's search on its trajectories (`gits.gits_paths`: cost
matrices, their average in warm-up order, DP). Reported per model, medians over --repeats runs in
this process, in wall time and in process CPU time: teacher, cost matrix, DP, and
search / teacher = (teacher + cost + DP) / teacher. The CPU-time ratio is the figure to quote on a
shared machine, where other processes stretch wall times unevenly. One thread by default: with
more threads than idle cores, OpenMP's barriers make the wall time of small tensor operations
depend on the other load. Writes benchmarks/results/search_cost.json.
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
import solver_utils                # noqa: E402
import solvers                     # noqa: E402
from torch_utils import misc       # noqa: E402


def clocks():
    return time.perf_counter(), time.process_time()


def one_search(model, opts):
    """Wall and CPU seconds of the teacher and of the search on its trajectories, and the schedule."""
    rounds = run_schedule.warmup_rounds(model, opts, model.device)
    t_tea = solver_utils.get_schedule(opts.num_steps_tea, model.sigma_min, model.sigma_max, 'polynomial', 7.0)
    w0, c0 = clocks()
    data, _, _ = gits.run_teachers(rounds, t_tea, opts.solver_tea)
    w1, c1 = clocks()
    split = {}
    paths = gits.gits_paths(data, t_tea, [opts.num_steps], opts.metric, opts.coeff, split)
    w2, c2 = clocks()
    return dict(teacher=w1 - w0, cost=split['cost'], dp=split['dp'], search=w2 - w1,
                teacher_cpu=c1 - c0, search_cpu=c2 - c1), [float(t) for t in t_tea[paths[opts.num_steps]]]


def measure(name, opts):
    model = models.load(name)
    runs, schedules = zip(*[one_search(model, opts) for _ in range(opts.repeats)])
    if any(s != schedules[0] for s in schedules):
        raise RuntimeError(f'{name}: the searched schedule changed between repeats')
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratio = statistics.median((r['teacher'] + r['search']) / r['teacher'] for r in runs)
    ratio_cpu = statistics.median((r['teacher_cpu'] + r['search_cpu']) / r['teacher_cpu'] for r in runs)
    ratios = [(r['teacher'] + r['search']) / r['teacher'] for r in runs]
    res = dict(seconds=med, runs=list(runs), ratio_wall=ratio, ratio_cpu=ratio_cpu,
               ratio_range=[min(ratios), max(ratios)], t_steps=schedules[0])
    teachers = [r['teacher'] for r in runs]
    print(f'[{name}] teacher {med["teacher"]:.3f}s ({med["teacher_cpu"]:.3f}s CPU; '
          f'runs {min(teachers):.2f}-{max(teachers):.2f}s), cost matrix {med["cost"]:.3f}s, DP {med["dp"]:.4f}s, '
          f'cost + DP {med["search"]:.3f}s ({med["search_cpu"]:.3f}s CPU); search / teacher: {ratio:.3f} wall '
          f'(runs {min(ratios):.3f}-{max(ratios):.3f}), {ratio_cpu:.3f} CPU (median of {opts.repeats})', flush=True)
    return res


@click.command()
@click.option('--datasets', default='gmm,gmm_wavelet,digits', show_default=True)
@click.option('--num_warmup', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--num_steps', type=click.IntRange(min=2), default=6, show_default=True)
@click.option('--num_steps_tea', type=click.IntRange(min=2), default=61, show_default=True)
@click.option('--solver_tea', type=click.Choice(sorted(solvers.SOLVERS)), default='ipndm', show_default=True)
@click.option('--metric', type=click.Choice(gits.METRICS), default='dev', show_default=True)
@click.option('--coeff', type=click.FloatRange(min=0, min_open=True), default=1.15, show_default=True)
@click.option('--warmup_seed', type=int, default=1_000_000_000, show_default=True)
@click.option('--repeats', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threads', type=click.IntRange(min=1), default=1, show_default=True)
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
    print(f'Wrote {opts.out}')


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
