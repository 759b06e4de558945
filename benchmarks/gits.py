"""Benchmark of the schedule searches on the exact analytic models (issues 4 and 10).

    python benchmarks/gits.py                       # default: < 15 minutes on 2 CPU cores
    python benchmarks/gits.py --num_warmup=256 --num_eval=256 --solvers=ipndm,unipc

For every solver and NFE on `gmm` and `digits`: the RMSE to `exact()` (the ODE solved to 1e-9) on
held-out seeds, mean and standard error over seeds, of
- fixed:    polynomial rho 7, logsnr, time_uniform rho 2, and the best of them on the held-out
            error (an optimistic baseline: it is picked on the evaluation seeds themselves);
- baseline: the seed README's schedule for the solver (ipndm*, euler, heun, dpm: polynomial;
            dpmpp, unipc: logsnr; deis: time_uniform rho 2);
- gits:     the paper's search (Euler-step 'dev' cost, DP with coeff 1.15; with afs its free step);
- student:  the solver-aware DP (student_search.student_dp);
- refined:  student_search.refine_schedule started from the best of gits/student/fixed on the warm-up set.
Warm-up seeds (from --warmup_seed) and evaluation seeds (from --eval_seed) are disjoint. The
teacher run (and GITS's cost matrix) is shared by all solvers. NFE = count_nfe: one-evaluation
solvers take NFE steps; Heun and DPM-Solver-2 take NFE/2 steps, or at odd NFE (NFE+1)/2 steps with
afs (the first evaluation saved), in every schedule mode alike. Prints tables and writes JSON.
"""

import json
import math
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib                      # noqa: E402
import gits                        # noqa: E402
import models                      # noqa: E402
import solver_utils                # noqa: E402
import solvers                     # noqa: E402
import student_search             # noqa: E402
from torch_utils import misc       # noqa: E402
from torch_utils.seeds import draw_seed_inputs   # noqa: E402

ALL_SOLVERS = ('euler', 'ipndm', 'ipndm_v', 'heun', 'dpm', 'dpmpp', 'deis', 'unipc')
BASELINE = dict(ipndm='polynomial', ipndm_v='polynomial', euler='polynomial', heun='polynomial', dpm='polynomial',
                dpmpp='logsnr', unipc='logsnr', deis='time_uniform')
FIXED = dict(student_search.FIXED_SCHEDULES)
MODES = ('baseline', 'best_fixed', 'gits', 'student', 'refined')


def latents(model, seeds):
    return draw_seed_inputs(seeds, model.shape, 0)[0]


def layout(solver, nfe):
    """(points of the schedule, afs) that spend exactly `nfe` evaluations."""
    per = solvers.SOLVER_SPECS[solver].evals_per_step
    afs = nfe % per != 0
    steps = (nfe + int(afs)) // per
    assert solvers.count_nfe(solver, steps + 1, afs) == nfe
    return steps + 1, afs


def held_out(model, lat, ref, t_steps, solver, options, afs):
    """Per-seed RMSE [E] of the solver on t_steps against the exact solution."""
    with torch.no_grad():
        x = solvers.SOLVERS[solver](model.denoise, lat * float(t_steps[0]), t_steps, afs=afs, **options)
    return misc.per_seed_rmse(x, ref)


def stats(errors):
    e = errors.to(torch.float64)
    return dict(mean=float(e.mean()), se=float(e.std() / math.sqrt(len(e))))


def run_dataset(name, opts):
    model = models.load(name)
    smin, smax = model.sigma_min, model.sigma_max
    warm = latents(model, range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup))
    evals = latents(model, range(opts.eval_seed, opts.eval_seed + opts.num_eval))
    t0 = time.perf_counter()
    ref = model.exact(evals * smax, smax, smin)
    print(f'[{name}] exact reference for {opts.num_eval} seeds: {time.perf_counter() - t0:.1f}s', flush=True)

    t_tea = solver_utils.get_schedule(opts.num_steps_tea, smin, smax, 'polynomial', 7.0)
    timing = {}
    t0 = time.perf_counter()
    data, _, teacher_evals = gits.run_teachers([(0, model.denoise, warm)], t_tea, opts.solver_tea)
    timing['teacher'] = time.perf_counter() - t0
    teacher_err = stats(held_out(model, evals, ref, t_tea, opts.solver_tea, {}, False))
    max_points = max(layout(s, n)[0] for s in opts.solver_list for n in opts.nfe_list)
    gits_paths = gits.gits_paths(data, t_tea, list(range(2, max_points + 1)), 'dev', 1.15, timing)
    out = dict(teacher=dict(evals=teacher_evals, seconds=timing['teacher'], rmse=teacher_err),
               gits_search=dict(cost_seconds=timing['cost'], dp_seconds=timing['dp']), solvers={})
    print(f'[{name}] teacher {opts.solver_tea} x{opts.num_steps_tea}: {teacher_evals} evaluations, '
          f'{timing["teacher"]:.2f}s; its own RMSE {teacher_err["mean"]:.2e}; GITS cost matrix '
          f'{timing["cost"]:.2f}s, DP {timing["dp"]:.3f}s', flush=True)

    for solver in opts.solver_list:
        options = solvers.resolve_options(solver, {})
        configs = {n: layout(solver, n) for n in opts.nfe_list}
        student = {}
        for afs in sorted({a for _, a in configs.values()}):
            steps = max(p for p, a in configs.values() if a == afs) - 1
            tm = {}
            paths, spent = student_search.student_dp(data, t_tea, steps, solver, options, afs, 1.15, grid=opts.student_grid, timing=tm)
            student[afs] = (paths, spent, tm['student'])
        rows = {}
        for nfe, (points, afs) in configs.items():
            row = dict(points=points, afs=afs, schedules={}, rmse={}, cost={})
            schedules = {kind: solver_utils.get_schedule(points, smin, smax, kind, rho) for kind, rho in FIXED.items()}
            path = gits_paths[points - int(afs)]
            if afs:
                t1 = time.perf_counter()
                sched, path, _ = gits.afs_free_step(data, t_tea, path, solver, options)
                row['cost']['gits_afs_seconds'] = time.perf_counter() - t1
            if len(path) == points:
                schedules['gits'] = t_tea[path].clone()
            paths, spent, secs = student[afs]
            schedules['student'] = t_tea[paths[points]].clone()
            row['cost']['student'] = dict(evals=spent, seconds=secs)
            budget = int(opts.refine_budget * teacher_evals)
            inits = {k: v for k, v in schedules.items()}
            subset = student_search.refine_subset(budget, nfe, opts.num_warmup, len(inits))
            tm = {}
            schedules['refined'], info = student_search.refine_schedule(data, inits, solver, options, afs, budget, subset,
                                                              timing=tm)
            row['cost']['refine'] = dict(evals=info['evals'], seconds=tm['refine'], budget=budget, subset=subset,
                                         start=info['start'], warmup_start=info['start_objectives'],
                                         warmup_final=info['objective'])
            errors = {k: held_out(model, evals, ref, ts, solver, options, afs) for k, ts in schedules.items()}
            best_fixed = min(FIXED, key=lambda k: float(errors[k].mean()))
            errors['best_fixed'] = errors[best_fixed]
            errors['baseline'] = errors[BASELINE[solver]]
            row['best_fixed'] = best_fixed
            row['rmse'] = {k: stats(e) for k, e in errors.items()}
            # Refined against the better of GITS and the best fixed schedule, paired per seed.
            rival = min([k for k in ('gits', 'best_fixed') if k in errors], key=lambda k: float(errors[k].mean()))
            diff = errors['refined'] - errors[rival]
            row['refined_vs'] = dict(rival=rival, diff=float(diff.mean()), se=float(diff.std() / math.sqrt(len(diff))))
            row['schedules'] = {k: solver_utils.format_t_steps(v) for k, v in schedules.items()}
            rows[nfe] = row
            r = row['rmse']
            print(f'[{name}] {solver:8s} NFE {nfe:2d}: ' + '  '.join(
                f'{k} {r[k]["mean"]:.4f}' for k in MODES if k in r) +
                f'  (refined from {info["start"]}, {info["evals"]} evals)', flush=True)
        out['solvers'][solver] = rows
    return out


def table(name, res, nfe_list):
    lines = [f'### {name}: RMSE to exact (mean over held-out seeds; +- standard error)', '',
             '| solver | NFE | baseline | best fixed | GITS DP | solver-aware DP | refined | refined - rival (SE) |',
             '|---|---|---|---|---|---|---|---|']
    for solver, rows in res['solvers'].items():
        for nfe in nfe_list:
            row = rows[nfe]
            r = row['rmse']

            def cell(k):
                return f'{r[k]["mean"]:.4f}' if k in r else 'n/a'
            rv = row['refined_vs']
            afs = ' (afs)' if row['afs'] else ''
            lines.append(f'| {solver}{afs} | {nfe} | {cell("baseline")} | {cell("best_fixed")} ({row["best_fixed"]}) | '
                         f'{cell("gits")} | {cell("student")} | {cell("refined")} +- {r["refined"]["se"]:.4f} | '
                         f'{rv["diff"]:+.4f} ({rv["se"]:.4f}) vs {rv["rival"]} |')
    return '\n'.join(lines)


def cost_table(name, res, nfe_list):
    t = res['teacher']
    lines = [f'### {name}: search cost', '',
             f'teacher: {t["evals"]} evaluations, {t["seconds"]:.2f}s; GITS cost matrix '
             f'{res["gits_search"]["cost_seconds"]:.2f}s, DP {res["gits_search"]["dp_seconds"]:.3f}s (shared by all solvers)', '',
             '| solver | solver-aware DP evals | seconds | refine evals (NFE ' + '/'.join(map(str, nfe_list)) +
             ') | refine seconds |', '|---|---|---|---|---|']
    for solver, rows in res['solvers'].items():
        runs = {r['afs']: r['cost']['student'] for r in rows.values()}     # one DP per afs setting
        spent = [c['evals'] for c in runs.values()]
        secs = [c['seconds'] for c in runs.values()]
        lines.append(f'| {solver} | {sum(spent)} | {sum(secs):.1f} | ' +
                     '/'.join(str(rows[n]['cost']['refine']['evals']) for n in nfe_list) +
                     f' | {sum(rows[n]["cost"]["refine"]["seconds"] for n in nfe_list):.1f} |')
    return '\n'.join(lines)


def best_recipes(results, nfe_targets=(5, 10)):
    """Best (solver, mode) at each NFE against UniPC with the paper's DP schedule."""
    out = {}
    for name, res in results.items():
        for nfe in nfe_targets:
            cands = [(row['rmse'][m]['mean'], solver, m) for solver, rows in res['solvers'].items()
                     if nfe in rows for row in [rows[nfe]] for m in ('best_fixed', 'gits', 'student', 'refined')
                     if m in row['rmse']]
            if not cands:
                continue
            best = min(cands)
            unipc = res['solvers'].get('unipc', {}).get(nfe, {}).get('rmse', {}).get('gits')
            ratio = best[0] / unipc['mean'] if unipc else None
            out[f'{name}/nfe{nfe}'] = dict(rmse=best[0], solver=best[1], mode=best[2],
                                           unipc_gits=unipc['mean'] if unipc else None, ratio=ratio)
    return out


@click.command()
@click.option('--datasets', default='gmm,digits', show_default=True)
@click.option('--solvers', 'solver_names', default=','.join(ALL_SOLVERS), show_default=True)
@click.option('--nfes', default='4,5,6,8,10', show_default=True)
@click.option('--num_warmup', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--num_eval', type=click.IntRange(min=2), default=64, show_default=True)
@click.option('--warmup_seed', type=int, default=1_000_000_000, show_default=True)
@click.option('--eval_seed', type=int, default=0, show_default=True)
@click.option('--num_steps_tea', type=int, default=61, show_default=True)
@click.option('--solver_tea', default='ipndm', show_default=True)
@click.option('--student_grid', type=int, default=21, show_default=True, help='Candidate points of the solver-aware DP')
@click.option('--refine_budget', type=float, default=4.0, show_default=True, help='Refinement evaluations / teacher evaluations')
@click.option('--threads', type=int, default=2, show_default=True)
@click.option('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'gits.json'),
              show_default=True)
def main(datasets, solver_names, nfes, **kw):
    """Schedule searches on the exact analytic models: RMSE to exact() and search cost."""
    opts = dnnlib.EasyDict(kw)
    torch.set_num_threads(opts.threads)
    opts.solver_list = [s for s in solver_names.split(',') if s]
    for s in opts.solver_list:
        if s not in solvers.SOLVERS:
            raise dnnlib.util.UserError(f'--solvers: unknown solver "{s}"; choose from {", ".join(solvers.SOLVERS)}')
    opts.nfe_list = sorted(misc.parse_int_list(nfes))
    if opts.warmup_seed < opts.eval_seed + opts.num_eval and opts.eval_seed < opts.warmup_seed + opts.num_warmup:
        raise dnnlib.util.UserError('--warmup_seed: warm-up and evaluation seeds overlap')
    start = time.perf_counter()
    results = {}
    for name in datasets.split(','):
        results[name] = run_dataset(name, opts)
    recipes = best_recipes(results)
    total = time.perf_counter() - start
    for name, res in results.items():
        print()
        print(table(name, res, opts.nfe_list))
        print()
        print(cost_table(name, res, opts.nfe_list))
    print()
    print('### Best recipe vs UniPC on the GITS DP schedule')
    for key, r in recipes.items():
        ratio = f'{r["ratio"]:.3f}' if r['ratio'] is not None else 'n/a'
        print(f'- {key}: {r["solver"]} / {r["mode"]}: {r["rmse"]:.4f}; UniPC+GITS {r["unipc_gits"]}; ratio {ratio}')
    print(f'\nTotal {total:.0f}s')
    record = dict(options={k: v for k, v in opts.items()}, results=results, best_recipes=recipes, seconds=total)
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    misc.atomic_write_json(opts.out, json.loads(json.dumps(record, default=str)))
    print(f'Wrote {opts.out}')


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
