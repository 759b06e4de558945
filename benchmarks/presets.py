"""Published SD schedules against a GITS schedule searched here, on the exact analytic models (issue 17).

    python benchmarks/presets.py                   # gmm and digits, NFE 5/6/8/10; ~25 minutes on 2 CPU cores
    python benchmarks/presets.py --models=digits --solvers=euler --num_eval=256

Every schedule spans the presets' sigma range, SD's 14.6146 down to 0.0292 (inside the analytic
models' 80..0.002), and takes NFE steps with a one-evaluation solver:
- gits_here:  gits.search_schedule on this model (iPNDM teacher on 61 polynomial points of that
              range, `dev` cost, coeff 1.15) from --num_warmup warm-up seeds;
- gits_table: ComfyUI's GITS table for SD v1.5 (gits_sd15, its default coeff 1.20);
- ays:        Align Your Steps for SD v1.5 (ays_sd15, interpolated to NFE steps);
- polynomial: EDM's rho = 7 schedule on the same range.
Error: per-seed RMSE of the solver's output against the exact ODE solution from the same start
(`exact(x, 14.6146, 0.0292)`), mean over --num_eval held-out seeds (disjoint from the warm-up
seeds); for each schedule, the mean per-seed difference to gits_here and its paired standard
error. Writes benchmarks/results/presets.json, prints a table, and writes its markdown (presets.md).
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib                      # noqa: E402
import gits                        # noqa: E402
import models                      # noqa: E402
import schedule_presets            # noqa: E402
import schedules                   # noqa: E402
import solvers                     # noqa: E402
from torch_utils import misc       # noqa: E402
from analytic import paired         # noqa: E402
import render                      # noqa: E402

SIGMA_MAX, SIGMA_MIN = 14.61464119, 0.02916753      # the ends of every preset
SCHEDULES = ('gits_here', 'gits_table', 'ays', 'polynomial')
SOLVER_OPTIONS = {'euler': {}, 'ipndm': {}, 'dpmpp': {'max_order': 2}}     # dpmpp 2M: ComfyUI's dpmpp_2m
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'presets.json')


def seeded_latents(shape, seeds):
    return torch.stack([torch.randn(list(shape), generator=misc.seed_generator(s), dtype=torch.float64)
                        for s in seeds])


def schedules_for(nfe, search):
    """The four schedules of nfe steps (float64 tensors)."""
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)
    return dict(gits_here=search(nfe + 1),
                gits_table=as_tensor(schedule_presets.preset_t_steps(f'gits_sd15:coeff=1.20:steps={nfe}')),
                ays=as_tensor(schedule_presets.preset_t_steps(f'ays_sd15:steps={nfe}')),
                polynomial=schedules.get_schedule(nfe + 1, SIGMA_MIN, SIGMA_MAX, 'polynomial', 7.0))


def rmse_per_seed(model, lat, ref, t_steps, solver):
    options = solvers.resolve_options(solver, SOLVER_OPTIONS[solver])
    with torch.no_grad():
        x = solvers.SOLVERS[solver](model.denoise, lat * float(t_steps[0]), t_steps, **options)
    return (x - ref).reshape(len(x), -1).square().mean(-1).sqrt()


def run_model(name, opts):
    model = models.load(name)
    warm = seeded_latents(model.shape, range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup))
    lat = seeded_latents(model.shape, range(opts.eval_seed, opts.eval_seed + opts.num_eval))
    ref = model.exact(lat * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN)
    seconds = {}

    def search(num_steps):
        t0 = time.perf_counter()
        t = gits.search_schedule(model.denoise, warm, num_steps=num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                 num_steps_tea=gits.NUM_STEPS_TEA, solver_tea=gits.SOLVER_TEA, metric=gits.METRIC,
                                 coeff=gits.COEFF)
        seconds[num_steps - 1] = time.perf_counter() - t0
        return t

    rows = {}
    for nfe in opts.nfe_list:
        scheds = schedules_for(nfe, search)
        assert all(solvers.count_nfe(s, nfe + 1) == nfe for s in opts.solver_list)
        row = dict(schedules={k: schedules.format_t_steps(v) for k, v in scheds.items()}, solvers={})
        for solver in opts.solver_list:
            errors = {k: rmse_per_seed(model, lat, ref, t, solver) for k, t in scheds.items()}
            row['solvers'][solver] = {k: dict(rmse=float(e.mean()), **paired(e, errors['gits_here']))
                                      for k, e in errors.items()}
        rows[nfe] = row
        print(f'[{name}] NFE {nfe}: ' + '; '.join(
            f'{s} ' + ' '.join(f'{k} {v["rmse"]:.4f}' for k, v in row['solvers'][s].items()) for s in opts.solver_list),
            flush=True)
    return dict(rows=rows, search_seconds=seconds)


def table(results, nfe_list, solver_list):
    lines = ['RMSE to the exact ODE solution (mean over held-out seeds); in brackets: difference to gits_here, '
             '+- paired standard error', '',
             '| model | solver | NFE | ' + ' | '.join(SCHEDULES) + ' |', '|---|---|---|' + '---|' * len(SCHEDULES)]
    for name, res in results.items():
        for solver in solver_list:
            for nfe in nfe_list:
                cells = res['rows'][str(nfe)]['solvers'][solver]
                best = min(cells, key=lambda k: cells[k]['rmse'])
                text = []
                for k in SCHEDULES:
                    c = cells[k]
                    value = f'**{c["rmse"]:.4f}**' if k == best else f'{c["rmse"]:.4f}'
                    text.append(value if k == 'gits_here' else f'{value} ({c["diff"]:+.4f} +- {c["se"]:.4f})')
                lines.append(f'| {name} | {solver} | {nfe} | ' + ' | '.join(text) + ' |')
    return '\n'.join(lines)


def compact_table(results, nfe_list, solver_list, solver_options):
    """One cell per model, solver and NFE: the four schedules' RMSE, the lowest in bold."""
    lines = ['| model | solver | ' + ' | '.join(f'NFE {n}' for n in nfe_list) + ' |',
             '|---|---|' + '---|' * len(nfe_list)]
    for name, res in results.items():
        for solver in solver_list:
            row = []
            for nfe in nfe_list:
                cells = res['rows'][str(nfe)]['solvers'][solver]
                best = min(cells, key=lambda k: cells[k]['rmse'])
                row.append(' / '.join(f'**{cells[k]["rmse"]:.3f}**' if k == best else f'{cells[k]["rmse"]:.3f}'
                                      for k in SCHEDULES))
            label = solver + (' 2M' if solver_options[solver].get('max_order') == 2 else '')
            lines.append(f'| {name} | {label} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def markdown(record):
    """{key: (title, body)} from the JSON record."""
    o = record['options']
    lo, hi = record['sigma_range']
    return dict(
        compact=(f'Searched / GITS table / AYS / polynomial on sigma {hi:.4f}..{lo:.3g} (RMSE to exact, mean over '
                 f'{o["num_eval"]} held-out seeds; lowest in bold)',
                 compact_table(record['results'], o['nfe_list'], o['solver_list'], record['solver_options'])),
        full=('Each schedule against the searched one (paired)',
              table(record['results'], o['nfe_list'], o['solver_list'])))


@click.command()
@click.option('--models', 'model_names', default='gmm,digits', show_default=True, help='Analytic models')
@click.option('--solvers', 'solver_names', default='euler,ipndm,dpmpp', show_default=True,
              help='One-evaluation solvers (dpmpp runs as 2M)')
@click.option('--nfe', default='5,6,8,10', show_default=True, help='NFE values (= steps)')
@click.option('--num_warmup', type=click.IntRange(min=1), default=128, show_default=True, help='GITS warm-up seeds')
@click.option('--num_eval', type=click.IntRange(min=2), default=64, show_default=True, help='Held-out seeds')
@click.option('--warmup_seed', type=int, default=1_000_000, show_default=True)
@click.option('--eval_seed', type=int, default=0, show_default=True)
@click.option('--out', default=RESULTS, show_default=True, help='JSON results file')
def main(model_names, solver_names, nfe, num_warmup, num_eval, warmup_seed, eval_seed, out):
    """GITS searched here vs the published SD schedules on the exact analytic models."""
    opts = dnnlib.EasyDict(num_warmup=num_warmup, num_eval=num_eval, warmup_seed=warmup_seed, eval_seed=eval_seed,
                           model_list=[m.strip() for m in model_names.split(',')],
                           solver_list=[s.strip() for s in solver_names.split(',')],
                           nfe_list=misc.parse_int_list(nfe))
    for name in opts.model_list:
        if name not in ('gmm', 'digits'):
            raise dnnlib.util.UserError(f'--models: only the exact models gmm, digits (got "{name}")')
    for solver in opts.solver_list:
        if solver not in SOLVER_OPTIONS:
            raise dnnlib.util.UserError(f'--solvers: one of {", ".join(SOLVER_OPTIONS)} (got "{solver}")')
    if min(opts.nfe_list) < 2 or max(opts.nfe_list) > 20:
        raise dnnlib.util.UserError('--nfe: values in 2..20 (the GITS table\'s step counts)')
    results = json.loads(json.dumps({name: run_model(name, opts) for name in opts.model_list}))   # as stored
    text = table(results, opts.nfe_list, opts.solver_list)
    print(text)
    record = dict(command=' '.join(sys.argv), sigma_range=[SIGMA_MIN, SIGMA_MAX], options=dict(opts),
                  solver_options=SOLVER_OPTIONS, results=results, table=text)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    misc.atomic_write_json(out, record)
    render.write_markdown(out, markdown)


if __name__ == '__main__':
    dnnlib.run_cli(main)
