"""Solver accuracy on the analytic models: RMSE to the exact ODE solution (per seed, then the mean
over seeds, as everywhere in the project) for every solver x schedule at NFE 3..10, 12, 15, 20,
and each solver's own cost per step (denoiser excluded). Schedules: polynomial rho 7, logsnr,
time_uniform rho 2 (the seed recipe for DEIS).

    python benchmarks/solvers.py                       # gmm and digits, 32 seeds (1-6 min on 2 cores)
    python benchmarks/solvers.py --models=gmm --seeds=0-63 --afs=True

Latents are float64 (seeds drawn as sample.py draws them); the reference is
model.exact(x, t_steps[0], t_steps[-1]), every schedule ending at the model's sigma_min. NFE ->
num_steps uses solvers.count_nfe; an NFE a solver cannot reach (odd NFE for heun/dpm) is '-'.
Writes benchmarks/results/solvers.json and its markdown tables (solvers.md).
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib                    # noqa: E402
import render                    # noqa: E402
import models                    # noqa: E402
import schedules                 # noqa: E402
import solvers                   # noqa: E402
from analytic import latents, num_points_for, parse_models_and_seeds, run_and_write   # noqa: E402
from torch_utils import misc     # noqa: E402

NFES = (3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20)
SCHEDULES = {'polynomial': 7.0, 'logsnr': 7.0, 'time_uniform': 2.0}     # schedule -> rho
RECIPES = {'euler': 'polynomial', 'heun': 'polynomial', 'dpm': 'polynomial', 'ipndm': 'polynomial',
           'ipndm_v': 'polynomial', 'deis': 'time_uniform', 'dpmpp': 'logsnr', 'unipc': 'logsnr'}
RECIPE_NFES = (5, 6, 8, 10)      # the columns of the docs' recipe table


def solver_overhead(solver, x, num_points, repeats=20):
    """Seconds per step spent in the solver itself: the denoiser returns a precomputed tensor."""
    fixed = torch.zeros_like(x)
    ts = schedules.get_schedule(num_points, 0.002, 80)
    fn = solvers.SOLVERS[solver]
    fn(lambda x_, s: fixed, x, ts)       # warm the coefficient cache, as repeated batches do
    best = float('inf')
    for _ in range(repeats):     # the minimum: other processes on the machine only add time
        start = time.perf_counter()
        fn(lambda x_, s: fixed, x, ts)
        best = min(best, time.perf_counter() - start)
    return best / (num_points - 1)


def run(model_names, seeds, afs):
    results = dict(nfes=list(NFES), schedules=SCHEDULES, seeds=seeds, afs=afs, models={})
    for name in model_names:
        model = models.load(name)
        x = latents(model, seeds)
        exact = model.exact(x, model.sigma_max, model.sigma_min)
        start = time.perf_counter()
        for _ in range(5):
            model.denoise(x, 1.0)
        per_call = (time.perf_counter() - start) / 5
        table = {}
        for solver in solvers.SOLVERS:
            for schedule, rho in SCHEDULES.items():
                row = []
                for nfe in NFES:
                    n = num_points_for(solver, nfe, afs=afs)
                    if n is None or n < 2:
                        row.append(None)
                        continue
                    ts = schedules.get_schedule(n, model.sigma_min, model.sigma_max, schedule, rho)
                    out = solvers.SOLVERS[solver](model.denoise, x, ts, afs=afs)
                    row.append(float(misc.per_seed_rmse(out, exact).mean()))
                table[f'{solver}/{schedule}'] = row
        overhead = {s: solver_overhead(s, x.float(), 11) for s in solvers.SOLVERS}
        results['models'][name] = dict(rmse=table, denoiser_seconds_per_call=per_call,
                                       solver_seconds_per_step=overhead, batch=len(seeds))
    return results


def print_tables(results):
    for name, res in results['models'].items():
        print(f'\n{name}: RMSE to exact(), mean over {len(results["seeds"])} seeds, afs={results["afs"]} '
              f'(* = default recipe)')
        print(f'{"solver/schedule":26s}' + ''.join(f'{"NFE " + str(n):>10s}' for n in results['nfes']))
        for key, row in res['rmse'].items():
            solver, schedule = key.split('/')
            mark = '*' if RECIPES[solver] == schedule else ' '
            print(f'{mark}{key:25s}' + ''.join(f'{v:10.2e}' if v is not None else f'{"-":>10s}' for v in row))
        print(f'denoiser: {res["denoiser_seconds_per_call"] * 1e3:.2f} ms per call (batch {res["batch"]}, float64); '
              'solver alone, per step (float32, denoiser excluded):')
        print('  ' + ', '.join(f'{s} {t * 1e6:.0f} us' for s, t in res['solver_seconds_per_step'].items()))


def markdown(results):
    """{key: (title, body)}: per model, the seed recipes at NFE 5, 6, 8, 10 and every solver x
    schedule at every NFE; the solvers' own time per step against a denoiser call."""
    n = len(results['seeds'])
    sections = {}
    for name, res in results['models'].items():
        columns = [i for i, nfe in enumerate(results['nfes']) if nfe in RECIPE_NFES]
        lines = ['| solver (recipe) | ' + ' | '.join(f'NFE {results["nfes"][i]}' for i in columns) + ' |',
                 '|---|' + '---|' * len(columns)]
        for solver, schedule in RECIPES.items():
            row = res['rmse'][f'{solver}/{schedule}']
            lines.append(f'| {solver} ({schedule}) | ' + ' | '.join(_cell(row[i]) for i in columns) + ' |')
        sections[f'{name}-recipes'] = (f'{name}: RMSE to exact, seed recipes (mean over {n} seeds, afs={results["afs"]})',
                                       '\n'.join(lines))
        lines = ['| solver/schedule | ' + ' | '.join(f'NFE {v}' for v in results['nfes']) + ' |',
                 '|---|' + '---|' * len(results['nfes'])]
        lines += [f'| {key} | ' + ' | '.join(_cell(v) for v in row) + ' |' for key, row in res['rmse'].items()]
        sections[f'{name}-all'] = (f'{name}: RMSE to exact, every solver and schedule (mean over {n} seeds)',
                                   '\n'.join(lines))
    lines = ['| model | denoiser call (batch) | ' + ' | '.join(solvers.SOLVERS) + ' |',
             '|---|---|' + '---|' * len(solvers.SOLVERS)]
    for name, res in results['models'].items():
        per_step = res['solver_seconds_per_step']
        lines.append(f'| {name} | {res["denoiser_seconds_per_call"] * 1e3:.3g} ms ({res["batch"]}) | ' +
                     ' | '.join(f'{per_step[s] * 1e6:.0f} µs' for s in solvers.SOLVERS) + ' |')
    sections['overhead'] = ('Time per step in the solver itself (denoiser excluded) against one denoiser call',
                            '\n'.join(lines))
    return sections


def _cell(value):
    return '-' if value is None else render.sig3(value)


@click.command()
@click.option('--models', 'model_names', type=str, default='gmm,digits', help='Comma-separated analytic models')
@click.option('--seeds', type=str, default='0-31', help='Seeds of the latents, e.g. 0-31')
@click.option('--afs', type=click.BOOL, default=False, help='Analytical first step')
@click.option('--out', type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'solvers.json'),
              help='JSON output')
def main(model_names, seeds, afs, out):
    """Solver x schedule accuracy table on the analytic models."""
    names, seed_list = parse_models_and_seeds(model_names, seeds)
    run_and_write(lambda: run(names, seed_list, afs), print_tables, out, markdown)


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
