"""Benchmark of the schedule searches on the exact analytic models (issues 4, 10 and 16).

    python benchmarks/gits.py --solvers=ipndm,dpmpp,unipc     # about 45 minutes on 2 quiet CPU cores
    python benchmarks/gits.py --datasets=gmm --solvers=ipndm,unipc --nfes=5,10 --num_eval=128

Defaults: models digits, gmm and gmm_wavelet; all 8 solvers; NFE 3, 4, 5, 6, 8, 10; 256 warm-up
seeds (the search's) and 512 held-out seeds (the measurement's); the refinement's budget and each
recipe's are sample.py's defaults (6 teacher runs; 12 for learned coefficients), or --refine_budget
for all of them.

For every model, solver and NFE (a cell) it measures the RMSE to `exact()` (the ODE solved to
1e-9) on the held-out seeds, mean and standard error over seeds, of
- fixed:      polynomial rho 7, logsnr, time_uniform rho 2, and the best of them on the held-out
              error (an optimistic baseline: it is picked on the evaluation seeds themselves);
- baseline:   the seed README's schedule for the solver (ipndm*, euler, heun, dpm: polynomial;
              dpmpp, unipc: logsnr; deis: time_uniform rho 2);
- gits:       the paper's search (Euler-step 'dev' cost, DP with coeff 1.15; with afs its free step);
- student:    the solver-aware DP (student_search.student_dp, run for this cell's length alone);
- rotation:   equal total rotation along the same teacher runs (rotation.py, `--search=rotation`;
              issue 30), not a start of the refinement;
- refined:    student_search.refine_found, started from gits, student and the fixed schedules,
              with sample.py's budget for one num_steps: refine_budget teacher runs of its own
              evaluations, the teacher runs of its check set (the num_warmup seeds after the
              warm-up ones) included (the solver-aware DP's and the afs free step's are reported
              apart).

Verdict ("never loses"): on the held-out seeds, refined against the best of the schedules that the
refinement started from (lowest held-out mean, so again picked on the evaluation seeds), paired per
seed: d = err_refined - err_best_start, diff = mean(d), se = std(d) / sqrt(n); LOSS if diff > se,
else ok. A start that the budget left the refinement no evaluations to compare counts too (marked
'not compared'). Per cell it also records whether the refinement was kept, rejected by its own
check on its check set, or took no step, and its evaluations against its budget.

Quality (issue 16's table), per model and NFE: UniPC on the paper's GITS schedule (the peer)
against UniPC refined and against the solver whose refined schedule is best, with ratios to the
peer and paired standard errors of the differences; the summary asks for every best ratio <= 0.7.

Warm-up and check seeds (2 x num_warmup from --warmup_seed) and evaluation seeds (from
--eval_seed) are disjoint. The teacher runs (and GITS's cost matrix) are shared by all solvers;
every cell is charged its check set's teacher run, as sample.py charges it once per search. NFE = count_nfe: one-evaluation
solvers take NFE steps; Heun and DPM-Solver-2 take NFE/2 steps, or at odd NFE (NFE+1)/2 steps with
afs (the first evaluation saved), in every schedule mode alike. Prints markdown tables, writes them
to <out>.md and everything to <out> (JSON).
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
import rotation                    # noqa: E402
import schedules                   # noqa: E402
import solvers                     # noqa: E402
import student_search             # noqa: E402
from torch_utils import misc       # noqa: E402
from torch_utils.seeds import draw_seed_inputs   # noqa: E402
import render                      # noqa: E402
from analytic import paired   # noqa: E402

ALL_SOLVERS = ('euler', 'ipndm', 'ipndm_v', 'heun', 'dpm', 'dpmpp', 'deis', 'unipc')
BASELINE = dict(ipndm='polynomial', ipndm_v='polynomial', euler='polynomial', heun='polynomial', dpm='polynomial',
                dpmpp='logsnr', unipc='logsnr', deis='time_uniform')
FIXED = dict(student_search.FIXED_SCHEDULES)
MODES = ('baseline', 'best_fixed', 'gits', 'student', 'rotation', 'refined')
PEER = ('unipc', 'gits')           # issue 16's reference: UniPC on the paper's schedule
TARGET_RATIO = 0.7                 # issue 16: the best refined solver must beat the peer by 30%
LEARNED_GOALS = dict(vs_refined=0.6, vs_refined_nfes=(3, 4, 5, 6), not_worse_nfes=(8, 10), vs_peer=0.5,
                     vs_peer_nfes=(4, 5, 6, 8, 10), wall_time=3.0)    # issue 29


# ----------------------------------------------------------------------------------------------
# Measurement.

def latents(model, seeds):
    return draw_seed_inputs(seeds, model.shape, 0)[0]


def layout(solver, nfe):
    """(points of the schedule, afs) that spend exactly `nfe` evaluations; None if none does."""
    per = solvers.SOLVER_SPECS[solver].evals_per_step
    afs = nfe % per != 0
    steps = (nfe + int(afs)) // per
    if steps < 1 or solvers.count_nfe(solver, steps + 1, afs) != nfe:
        return None
    return steps + 1, afs


def held_out(model, lat, ref, t_steps, solver, options, afs, coefficients=None):
    """Per-seed RMSE [E] of the solver on t_steps (with `coefficients`, learned weights) against
    the exact solution."""
    if coefficients is not None:
        options = dict(options, coefficients=coefficients)
    with torch.no_grad():
        x = solvers.SOLVERS[solver](model.denoise, lat * float(t_steps[0]), t_steps, afs=afs, **options)
    return misc.per_seed_rmse(x, ref)


def stats(errors):
    e = errors.to(torch.float64)
    return dict(mean=float(e.mean()), se=float(e.std() / math.sqrt(len(e))))


def verdict(diff):
    # A loss must exceed one standard error: a smaller excess is within seed noise.
    return 'LOSS' if diff['diff'] > diff['se'] else 'ok'


def outcome(info):
    """What the refinement did: its result kept, or rejected by the held-out check of the warm-up
    set, or no step accepted at all (nothing to keep)."""
    if info['kept']:
        return 'kept'
    return 'rejected' if info['steps'] > 0 else 'no step'


# ----------------------------------------------------------------------------------------------
# Searches of one cell.

def gits_found(ctx, path, solver, options, afs):
    """The paper's path for this cell, with afs its free step: (path, evaluations, seconds)."""
    if not afs:
        return path, 0, 0.0
    t0 = time.perf_counter()
    _, path, evals = gits.afs_free_step(ctx.data, ctx.t_tea, path, solver, options)
    return path, evals, time.perf_counter() - t0


def student_found(ctx, points, solver, options, afs):
    """The solver-aware DP run for this cell's length alone, as sample.py runs it for one
    num_steps, so that its evaluations are the ones sample.py reports:
    (path or None, evaluations, seconds)."""
    t0 = time.perf_counter()
    paths, evals = student_search.student_dp(ctx.data, ctx.t_tea, points - 1, solver, options, afs, gits.COEFF,
                                             grid=ctx.opts.student_grid)
    return paths.get(points), evals, time.perf_counter() - t0


# Recipes beyond today's refinement, each measured per cell beside it: name -> Recipe. A recipe
# gets the cell's searched paths and budget (the same warm-up and check sets as the refinement),
# and returns (t_steps, coefficients or None, its info). It is compared with the refined schedule
# (same solver) and with the peer on the held-out seeds, paired.

class Recipe:
    def __init__(self, applies, run, label, budget=None):
        # budget: its default in teacher runs (None: the refinement's); --refine_budget overrides both
        self.applies, self.run, self.label, self.budget = applies, run, label, budget


def learned_recipe(ctx, solver, options, afs, found, points, budget):
    """Issue 29: the refinement fitting the solver's weights and evaluation noise levels with the
    points (refine_found with coefficients=True), from the same starts and warm-up and check sets."""
    _, t_steps, info = student_search.refine_found(ctx.data, ctx.check, ctx.t_tea, found, points, solver, options,
                                                   afs, budget, {}, coefficients=True)
    return t_steps, info['coefficients'], info


def multistep(solver):
    return solver in solvers.MULTISTEP


RECIPES = {
    'learned': Recipe(multistep, learned_recipe, 'learned coefficients',
                      budget=student_search.default_refine_budget(coefficients=True)),
    # The same fit at the refinement's own budget: what the larger default buys.
    'learned_same_budget': Recipe(multistep, learned_recipe, 'learned coefficients at the refinement\'s budget'),
}
DEFAULT_RECIPES = ('learned',)


def budget_error(e, solver, nfe, budget):
    if not str(e).startswith('--refine_budget'):
        raise e
    raise dnnlib.util.UserError(f'{e} ({solver}, NFE {nfe}: {budget} evaluations left)')


def run_recipes(ctx, solver, nfe, options, afs, found, points, errors):
    """Every recipe of --recipes that applies to `solver`, each with its own budget: its held-out
    errors go into `errors` (under its name); returns {name: record}."""
    out = {}
    for name in ctx.opts.recipe_list:
        recipe = RECIPES[name]
        if not recipe.applies(solver):
            continue
        budget = student_search.schedule_budget(ctx.opts.refine_budget or recipe.budget or student_search.REFINE_BUDGET,
                                                ctx.teacher_evals, ctx.check_evals, 1)
        t0 = time.perf_counter()
        try:
            t_steps, coefficients, info = recipe.run(ctx, solver, options, afs, found, points, budget)
        except ValueError as e:
            budget_error(e, solver, nfe, budget)
        seconds = time.perf_counter() - t0
        errors[name] = held_out(ctx.model, ctx.latents, ctx.ref, t_steps, solver, options, afs, coefficients)
        vs_refined = paired(errors[name], errors['refined'])
        out[name] = dict(rmse=stats(errors[name]), ratio_refined=float(errors[name].mean() / errors['refined'].mean()),
                         vs_refined=vs_refined, outcome=outcome(info), refine=info, seconds=seconds, evals=info['evals'],
                         budget=budget, schedule=schedules.format_t_steps(t_steps), coefficients=coefficients)
    return out


def run_cell(ctx, solver, nfe):
    """Searches, refinement and held-out errors of one (solver, NFE). Returns (row for the JSON,
    per-seed held-out errors {mode: [E]})."""
    options = solvers.resolve_options(solver, {})
    points, afs = layout(solver, nfe)
    gits_path, afs_evals, afs_seconds = gits_found(ctx, ctx.gits_paths[points - int(afs)], solver, options, afs)
    student_path, student_evals, student_seconds = student_found(ctx, points, solver, options, afs)
    found = {k: p for k, p in (('gits', gits_path), ('student', student_path)) if p is not None and len(p) == points}

    budget = student_search.schedule_budget(ctx.opts.refine_budget or student_search.REFINE_BUDGET, ctx.teacher_evals,
                                            ctx.check_evals, 1)
    t0 = time.perf_counter()
    try:
        inits, refined, info = student_search.refine_found(ctx.data, ctx.check, ctx.t_tea, found, points, solver,
                                                           options, afs, budget, {})
    except ValueError as e:
        budget_error(e, solver, nfe, budget)
    refine_seconds = time.perf_counter() - t0

    # Every fixed schedule is measured even if the refinement could not afford to compare it; the
    # starts themselves are the tensors refine_found started from.
    smin, smax = float(ctx.t_tea[-1]), float(ctx.t_tea[0])
    candidates = {kind: schedules.get_schedule(points, smin, smax, kind, rho) for kind, rho in FIXED.items()}
    candidates.update(inits)
    candidates['rotation'] = rotation.equal_rotation_points(ctx.rotation, ctx.t_tea, points)
    candidates['refined'] = refined
    errors = {k: held_out(ctx.model, ctx.latents, ctx.ref, ts, solver, options, afs) for k, ts in candidates.items()}
    best_fixed = min(FIXED, key=lambda k: float(errors[k].mean()))
    errors['best_fixed'] = errors[best_fixed]
    errors['baseline'] = errors[BASELINE[solver]]

    # Against every start it was given, also one the budget left it no evaluations to compare
    # (compared=False): a start it could not afford is still a schedule it failed to beat.
    best_start = min(inits, key=lambda k: float(errors[k].mean()))
    vs = dict(start=best_start, compared=best_start in info['start_objectives'],
              **paired(errors['refined'], errors[best_start]))
    vs['verdict'] = verdict(vs)
    rmse = {k: stats(e) for k, e in errors.items()}
    recipes = run_recipes(ctx, solver, nfe, options, afs, found, points, errors)
    row = dict(points=points, afs=afs, best_fixed=best_fixed, rmse=rmse, recipes=recipes,
               vs_best_start=vs, rotation_vs_gits=paired(errors['rotation'], errors['gits']), outcome=outcome(info), refine=info,
               cost=dict(student_evals=student_evals, student_seconds=student_seconds, afs_evals=afs_evals,
                         afs_seconds=afs_seconds, check_evals=ctx.check_evals, refine_evals=info['evals'],
                         refine_budget=budget, refine_seconds=refine_seconds),
               schedules={k: schedules.format_t_steps(v) for k, v in candidates.items()})
    return row, errors


def run_dataset(name, opts):
    """All cells of one model, and its quality table. The per-seed errors stay in memory: the
    quality table pairs them across solvers, and the JSON would be megabytes."""
    model = models.load(name)
    smin, smax = model.sigma_min, model.sigma_max
    warm = latents(model, range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup))
    ctx = dnnlib.EasyDict(model=model, opts=opts,
                          latents=latents(model, range(opts.eval_seed, opts.eval_seed + opts.num_eval)))
    t0 = time.perf_counter()
    ctx.ref = model.exact(ctx.latents * smax, smax, smin)
    print(f'[{name}] exact reference for {opts.num_eval} seeds: {time.perf_counter() - t0:.1f}s', flush=True)

    ctx.t_tea = schedules.get_schedule(opts.num_steps_tea, smin, smax, 'polynomial', 7.0)
    timing = {}
    t0 = time.perf_counter()
    ctx.data, _, ctx.teacher_evals = gits.run_teachers([(0, model.denoise, warm)], ctx.t_tea, opts.solver_tea)
    timing['teacher'] = time.perf_counter() - t0
    check_seeds = opts.warmup_seed + opts.num_warmup
    held = latents(model, range(check_seeds, check_seeds + opts.num_warmup * student_search.CHECK_PER_WARMUP))
    ctx.check, _, ctx.check_evals = gits.run_teachers([(0, model.denoise, held)], ctx.t_tea, opts.solver_tea)
    teacher_err = stats(held_out(model, ctx.latents, ctx.ref, ctx.t_tea, opts.solver_tea, {}, False))
    max_points = max(layout(s, n)[0] for s in opts.solver_list for n in opts.nfe_list)
    ctx.gits_paths = gits.gits_paths(ctx.data, ctx.t_tea, list(range(2, max_points + 1)), gits.METRIC, gits.COEFF, timing)
    t0 = time.perf_counter()
    ctx.rotation = rotation.mean_rotation(ctx.data)
    timing['rotation'] = time.perf_counter() - t0
    out = dict(teacher=dict(evals=ctx.teacher_evals, seconds=timing['teacher'], rmse=teacher_err),
               gits_search=dict(cost_seconds=timing['cost'], dp_seconds=timing['dp']),
               rotation_search=dict(seconds=timing['rotation'], mean_rotation=[float(r) for r in ctx.rotation]),
               solvers={})
    print(f'[{name}] teacher {opts.solver_tea} x{opts.num_steps_tea}: {ctx.teacher_evals} evaluations, '
          f'{timing["teacher"]:.2f}s; its own RMSE {teacher_err["mean"]:.2e}; GITS cost matrix '
          f'{timing["cost"]:.2f}s, DP {timing["dp"]:.3f}s', flush=True)

    per_seed = {}
    for solver in opts.solver_list:
        rows = {}
        for nfe in opts.nfe_list:
            rows[nfe], per_seed[solver, nfe] = run_cell(ctx, solver, nfe)
            r, vs = rows[nfe]['rmse'], rows[nfe]['vs_best_start']
            print(f'[{name}] {solver:8s} NFE {nfe:2d}: ' + '  '.join(f'{k} {r[k]["mean"]:.4f}' for k in MODES if k in r) +
                  f'  (from {rows[nfe]["refine"]["start"]}, {rows[nfe]["outcome"]}; vs {vs["start"]} '
                  f'{vs["diff"]:+.2g} ({vs["se"]:.2g}) {vs["verdict"]})' +
                  ''.join(f'  {k} {v["rmse"]["mean"]:.4f} (x{v["ratio_refined"]:.2f} refined, {v["outcome"]}'
                          f'{fit_objective(v["refine"])}, '
                          f'{v["seconds"]:.1f}s vs {rows[nfe]["cost"]["refine_seconds"]:.1f}s)'
                          for k, v in rows[nfe]['recipes'].items()), flush=True)
        out['solvers'][solver] = rows
    out['quality'] = quality(per_seed, opts.nfe_list)
    return out


# ----------------------------------------------------------------------------------------------
# Issue 16's quality table and the summary.

def against_peer(errors, peer):
    """Held-out mean and SE of `errors`, with its ratio to the peer's mean and the paired SE of
    the difference to the peer (None without a peer)."""
    s = stats(errors)
    if peer is None:
        return dict(s, ratio=None, diff=None, diff_se=None)
    d = paired(errors, peer)
    return dict(s, ratio=s['mean'] / float(peer.to(torch.float64).mean()), diff=d['diff'], diff_se=d['se'])


def quality(per_seed, nfe_list):
    """Per NFE: the peer (UniPC + GITS), UniPC refined, and the solver with the best refined
    schedule. The evaluation seeds are the same in every cell, so differences are paired."""
    out = {}
    for nfe in nfe_list:
        peer = per_seed.get((PEER[0], nfe), {}).get(PEER[1])
        refined = {s: e['refined'] for (s, n), e in per_seed.items() if n == nfe}
        best = min(refined, key=lambda s: float(refined[s].mean()))
        out[nfe] = dict(peer=stats(peer) if peer is not None else None,
                        unipc_refined=against_peer(refined[PEER[0]], peer) if PEER[0] in refined else None,
                        best_refined=dict(solver=best, **against_peer(refined[best], peer)),
                        recipes=recipe_quality(per_seed, nfe, peer, refined[best]))
    return out


def recipe_quality(per_seed, nfe, peer, best_refined):
    """Per recipe: the solver where it is best at this NFE, against the peer and against the best
    refined schedule of any solver (paired: the evaluation seeds are shared)."""
    out = {}
    for name in RECIPES:
        got = {s: e[name] for (s, n), e in per_seed.items() if n == nfe and name in e}
        if not got:
            continue
        best = min(got, key=lambda s: float(got[s].mean()))
        d = paired(got[best], best_refined)
        out[name] = dict(solver=best, **against_peer(got[best], peer),
                         ratio_refined=float(got[best].mean() / best_refined.mean()),
                         diff_refined=d['diff'], diff_refined_se=d['se'])
    return out


def summarize(results):
    cells = [(m, s, n, row) for m, res in results.items() for s, rows in res['solvers'].items()
             for n, row in rows.items()]
    losses = [dict(model=m, solver=s, nfe=n, **{k: vs[k] for k in ('start', 'compared', 'diff', 'se')})
              for m, s, n, row in cells for vs in [row['vs_best_start']] if vs['verdict'] == 'LOSS']
    outcomes = [row['outcome'] for *_, row in cells]
    over = [dict(model=m, solver=s, nfe=n, evals=row['cost']['refine_evals'], budget=row['cost']['refine_budget'])
            for m, s, n, row in cells if row['cost']['refine_evals'] > row['cost']['refine_budget']]

    def worst(key):
        ratios = [(q[key]['ratio'], m, n) for m, res in results.items() for n, q in res['quality'].items()
                  if q[key] is not None and q[key]['ratio'] is not None]
        if not ratios:
            return None
        r, m, n = max(ratios)
        return dict(ratio=r, model=m, nfe=n)
    best = worst('best_refined')
    goals = {name: recipe_goals(results, name) for name in RECIPES
             if any(name in q.get('recipes', {}) for res in results.values() for q in res['quality'].values())}
    return dict(recipes=goals, cells=len(cells), losses=len(losses), loss_cells=losses, kept=outcomes.count('kept'),
                rejected=outcomes.count('rejected'), no_step=outcomes.count('no step'), over_budget=over,
                worst_unipc_refined=worst('unipc_refined'), worst_best_refined=best, target_ratio=TARGET_RATIO,
                all_best_within_target=None if best is None else best['ratio'] <= TARGET_RATIO)


def recipe_goals(results, name, goals=LEARNED_GOALS):
    """Issue 29's goals for recipe `name` (its best solver per model and NFE): at most
    goals['vs_refined'] times the best refined schedule's error at the small NFEs, never worse than
    it by more than one paired SE at NFE 8 and 10, at most goals['vs_peer'] times the peer's from
    NFE 4 on; and its fit's wall time against the refinement's on gmm (all its cells)."""
    cells = [dict(model=m, nfe=int(n), **q['recipes'][name]) for m, res in results.items()
             for n, q in res['quality'].items() if name in q.get('recipes', {})]

    def failing(nfes, ok):
        return [dict(model=c['model'], nfe=c['nfe'], solver=c['solver'], ratio_refined=c['ratio_refined'],
                     ratio_peer=c['ratio'], diff_refined=c['diff_refined'], diff_refined_se=c['diff_refined_se'])
                for c in cells if c['nfe'] in nfes and not ok(c)]
    vs_refined = failing(goals['vs_refined_nfes'], lambda c: c['ratio_refined'] <= goals['vs_refined'])
    not_worse = failing(goals['not_worse_nfes'], lambda c: c['diff_refined'] <= c['diff_refined_se'])
    vs_peer = failing(goals['vs_peer_nfes'], lambda c: c['ratio'] is not None and c['ratio'] <= goals['vs_peer'])
    rows = [row for solver_rows in results.get('gmm', {}).get('solvers', {}).values() for row in solver_rows.values()
            if name in row.get('recipes', {})]
    fit = sum(r['recipes'][name]['seconds'] for r in rows)
    refine = sum(r['cost']['refine_seconds'] for r in rows)
    wall = fit / refine if rows and refine > 0 else None
    return dict(cells=len(cells), goals=dict(goals), vs_refined_failing=vs_refined, not_worse_failing=not_worse,
                vs_peer_failing=vs_peer, gmm_fit_seconds=fit, gmm_refine_seconds=refine, gmm_wall_time_ratio=wall,
                kept=sum(r['recipes'][name]['outcome'] == 'kept' for res in results.values()
                         for rs in res['solvers'].values() for r in rs.values() if name in r.get('recipes', {})),
                all_goals_met=bool(cells) and not (vs_refined or not_worse or vs_peer) and
                wall is not None and wall <= goals['wall_time'])


# ----------------------------------------------------------------------------------------------
# Markdown, rendered from the JSON record as written (NFE keys are strings there), so that
# `python benchmarks/render.py` reproduces it from the committed file without measuring.

RECIPE_SOLVERS = ('ipndm', 'dpmpp', 'unipc', 'deis')     # the seed README's recipes, against GITS
HEADLINE = (('ipndm', 'baseline'), ('ipndm', 'gits'), ('unipc', 'baseline'), ('unipc', 'gits'))


def start_name(vs):
    return vs['start'] if vs['compared'] else f'{vs["start"]} (not compared)'


def mean_se(s):
    return f'{s["mean"]:.4g} +- {s["se"]:.2g}'


def short(value):
    return render.sig3(value)


def bold_lower(a, b):
    """'a / b' with the lower of the two in bold."""
    a_text, b_text = short(a), short(b)
    return f'**{a_text}** / {b_text}' if a < b else f'{a_text} / **{b_text}**' if b < a else f'{a_text} / {b_text}'


def solver_table(res, nfe_list):
    lines = ['| solver | NFE | baseline | best fixed | GITS DP | solver-aware DP | refined | refinement | '
             'refined - best start (SE) | verdict | evals / budget |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for solver, rows in res['solvers'].items():
        for nfe in nfe_list:
            row = rows[str(nfe)]
            r, vs = row['rmse'], row['vs_best_start']

            def cell(k):
                return f'{r[k]["mean"]:.4g}' if k in r else 'n/a'
            afs = ' (afs)' if row['afs'] else ''
            lines.append(f'| {solver}{afs} | {nfe} | {cell("baseline")} | {cell("best_fixed")} ({row["best_fixed"]}) | '
                         f'{cell("gits")} | {cell("student")} | {mean_se(r["refined"])} | '
                         f'{row["outcome"]} (from {row["refine"]["start"]}, {row["refine"]["steps"]} steps) | '
                         f'{vs["diff"]:+.2g} ({vs["se"]:.2g}) vs {start_name(vs)} | {vs["verdict"]} | '
                         f'{row["cost"]["refine_evals"]} / {row["cost"]["refine_budget"]} |')
    return '\n'.join(lines)


def cost_table(res, nfe_list):
    t = res['teacher']
    lines = [f'teacher: {t["evals"]} evaluations, {t["seconds"]:.2f}s; GITS cost matrix '
             f'{res["gits_search"]["cost_seconds"]:.2f}s, DP {res["gits_search"]["dp_seconds"]:.3f}s (shared by all solvers)',
             '', '| solver | solver-aware DP evals | seconds | afs free-step evals | refine evals / budget | refine seconds |',
             '|---|---|---|---|---|---|']
    for solver, rows in res['solvers'].items():
        c = [rows[str(n)]['cost'] for n in nfe_list]

        def each(fmt):
            return ', '.join(fmt.format(**x) for x in c)
        lines.append(f'| {solver} | {each("{student_evals}")} | {sum(x["student_seconds"] for x in c):.1f} | '
                     f'{each("{afs_evals}")} | {each("{refine_evals}/{refine_budget}")} | '
                     f'{sum(x["refine_seconds"] for x in c):.1f} |')
    return '\n'.join(lines)


def vs_peer(s):
    if s is None:
        return 'n/a'
    if s['ratio'] is None:
        return mean_se(s)
    return f'{mean_se(s)} ({s["ratio"]:#.3g}; diff SE {s["diff_se"]:.2g})'


def quality_table(res, nfe_list):
    lines = ['| NFE | peer: UniPC + GITS | UniPC refined | best refined solver |', '|---|---|---|---|']
    for nfe in nfe_list:
        q = res['quality'][str(nfe)]
        peer = mean_se(q['peer']) if q['peer'] is not None else 'n/a'
        best = q['best_refined']
        lines.append(f'| {nfe} | {peer} | {vs_peer(q["unipc_refined"])} | {best["solver"]}: {vs_peer(best)} |')
    return '\n'.join(lines)


def recipes_table(results, nfe_list):
    """Each seed-README recipe against the same solver on the paper's GITS schedule."""
    lines = ['| model | solver: recipe / GITS | ' + ' | '.join(f'NFE {n}' for n in nfe_list) + ' |',
             '|---|---|' + '---|' * len(nfe_list)]
    for name, res in results.items():
        for solver in RECIPE_SOLVERS:
            if solver in res['solvers']:
                cells = [res['solvers'][solver][str(n)]['rmse'] for n in nfe_list]
                lines.append(f'| {name} | {solver} | ' + ' | '.join(
                    bold_lower(r['baseline']['mean'], r['gits']['mean']) for r in cells) + ' |')
    return '\n'.join(lines)


def refined_table(results, nfe_list):
    """UniPC on the GITS schedule (the peer) against the refined schedules, per model and NFE."""
    lines = ['| model | NFE | UniPC + GITS (peer) | UniPC refined | ratio | best refined | ratio |',
             '|---|---|---|---|---|---|---|']
    for name, res in results.items():
        for nfe in nfe_list:
            q = res['quality'][str(nfe)]
            if q['peer'] is None or q['unipc_refined'] is None:
                continue
            u, b = q['unipc_refined'], q['best_refined']
            lines.append(f'| {name} | {nfe} | {short(q["peer"]["mean"])} | {short(u["mean"])} | {u["ratio"]:.2f} | '
                         f'{b["solver"]}: {short(b["mean"])} | {b["ratio"]:.2f} |')
    return '\n'.join(lines)


def headline_table(results, nfe_list):
    """The README's table: iPNDM and UniPC on their seed recipes and on GITS, and the best refined."""
    names = {'baseline': 'recipe', 'gits': 'GITS'}
    lines = ['| model | NFE | ' + ' | '.join(f'{s} {names[m]}' for s, m in HEADLINE) + ' | best refined |',
             '|---|---|' + '---|' * (len(HEADLINE) + 1)]
    for name, res in results.items():
        if not all(s in res['solvers'] for s, _ in HEADLINE):
            continue
        for nfe in nfe_list:
            best = res['quality'][str(nfe)]['best_refined']
            lines.append(f'| {name} | {nfe} | ' + ' | '.join(
                short(res['solvers'][s][str(nfe)]['rmse'][m]['mean']) for s, m in HEADLINE) +
                f' | {short(best["mean"])} ({best["solver"]}) |')
    return '\n'.join(lines)


def rotation_table(results, nfe_list):
    """The rotation schedule against GITS, the refined schedule and the best fixed one, per model,
    solver and NFE; its paired difference to GITS, and which is lower by more than one SE."""
    lines = ['| model | solver | NFE | GITS | rotation | refined | best fixed | rotation - GITS (SE) | vs GITS |',
             '|---|---|---|---|---|---|---|---|---|']
    for name, res in results.items():
        for solver, rows in res['solvers'].items():
            for nfe in nfe_list:
                row = rows[str(nfe)]
                r, d = row['rmse'], row['rotation_vs_gits']
                verdict = 'wins' if d['diff'] < -d['se'] else 'loses' if d['diff'] > d['se'] else 'tie'
                lines.append(f'| {name} | {solver} | {nfe} | {short(r["gits"]["mean"])} | {short(r["rotation"]["mean"])} | '
                             f'{short(r["refined"]["mean"])} | {short(r["best_fixed"]["mean"])} ({row["best_fixed"]}) | '
                             f'{d["diff"]:+.2g} ({d["se"]:.2g}) | {verdict} |')
    return '\n'.join(lines)


def has_rotation(results):
    return any('rotation_vs_gits' in row for res in results.values() for rows in res['solvers'].values()
               for row in rows.values())


def recipe_table(results, nfe_list, name):
    """Recipe `name` (its best solver per model and NFE) against the best refined schedule and the
    peer, held-out RMSE; ratios with the paired SE of the difference."""
    lines = ['| model | NFE | peer: UniPC + GITS | best refined | ' + RECIPES[name].label + ' (best solver) | '
             'ratio to refined (diff SE) | ratio to peer |', '|---|---|---|---|---|---|---|']
    for model, res in results.items():
        for nfe in nfe_list:
            q = res['quality'][str(nfe)]
            r = q.get('recipes', {}).get(name)
            if r is None:
                continue
            peer = short(q['peer']['mean']) if q['peer'] is not None else 'n/a'
            ratio_peer = f'{r["ratio"]:.2f}' if r['ratio'] is not None else 'n/a'
            lines.append(f'| {model} | {nfe} | {peer} | {short(q["best_refined"]["mean"])} ({q["best_refined"]["solver"]}) | '
                         f'{short(r["mean"])} ({r["solver"]}) | {r["ratio_refined"]:.2f} ({r["diff_refined_se"]:.2g}) | '
                         f'{ratio_peer} |')
    return '\n'.join(lines)


def fit_objective(info):
    """'; path' or '; final': the objective of the kept joint fit of a learned-coefficient recipe."""
    return f'; {info["objective"]}' if info.get('objective') else ''


def recipe_cells_table(res, nfe_list, name):
    """Per solver and NFE of one model: the recipe against the refined schedule of the same
    solver (paired), what its fit did, its evaluations and wall time against the refinement's."""
    lines = ['| solver | NFE | refined | ' + RECIPES[name].label + ' | ratio | diff (SE) | fit | evals / budget | '
             'seconds (refinement) |', '|---|---|---|---|---|---|---|---|---|']
    for solver, rows in res['solvers'].items():
        for nfe in nfe_list:
            row = rows[str(nfe)]
            r = row.get('recipes', {}).get(name)
            if r is None:
                continue
            d = r['vs_refined']
            lines.append(f'| {solver} | {nfe} | {short(row["rmse"]["refined"]["mean"])} | {short(r["rmse"]["mean"])} | '
                         f'{r["ratio_refined"]:.2f} | {d["diff"]:+.2g} ({d["se"]:.2g}) | {r["outcome"]} '
                         f'({r["refine"]["steps"]} steps{fit_objective(r["refine"])}) | {r["evals"]} / {r["budget"]} | '
                         f'{r["seconds"]:.1f} ({row["cost"]["refine_seconds"]:.1f}) |')
    return '\n'.join(lines)


def recipe_summary(name, g):
    def cells(failing):
        return ''.join(f'\n  - {c["model"]} / NFE {c["nfe"]} ({c["solver"]}): x{c["ratio_refined"]:.2f} refined, '
                       f'diff {c["diff_refined"]:+.2g} ({c["diff_refined_se"]:.2g}), '
                       + (f'x{c["ratio_peer"]:.2f} peer' if c['ratio_peer'] is not None else 'no peer')
                       for c in failing)
    goals = g['goals']
    wall = 'n/a' if g['gmm_wall_time_ratio'] is None else f'{g["gmm_wall_time_ratio"]:.2f}'
    return '\n'.join([
        f'- {name}: {g["cells"]} model x NFE cells; kept in {g["kept"]} solver cells',
        f'- {name} > {goals["vs_refined"]} x best refined at NFE {", ".join(map(str, goals["vs_refined_nfes"]))}: '
        f'{len(g["vs_refined_failing"])} cells' + cells(g['vs_refined_failing']),
        f'- {name} worse than best refined by > 1 SE at NFE {", ".join(map(str, goals["not_worse_nfes"]))}: '
        f'{len(g["not_worse_failing"])} cells' + cells(g['not_worse_failing']),
        f'- {name} > {goals["vs_peer"]} x peer at NFE {", ".join(map(str, goals["vs_peer_nfes"]))}: '
        f'{len(g["vs_peer_failing"])} cells' + cells(g['vs_peer_failing']),
        f'- {name} fit wall time / refinement wall time on gmm: {wall} (goal <= {goals["wall_time"]})',
        f'- {name}: every goal met: {g["all_goals_met"]}'])


def wins(results):
    """Cells where the refined schedule beats the best of its starts by more than one paired SE."""
    return sum(row['vs_best_start']['diff'] < -row['vs_best_start']['se']
               for res in results.values() for rows in res['solvers'].values() for row in rows.values())


def summary_text(s, seconds, won):
    def ratio(w):
        return 'n/a' if w is None else f'{w["ratio"]:#.3g} ({w["model"]}, NFE {w["nfe"]})'
    lines = [f'- cells: {s["cells"]}; refinement kept {s["kept"]}, rejected {s["rejected"]}, no step {s["no_step"]}',
             f'- refined loses to its best start (diff > SE): {s["losses"]} cells' +
             ''.join(f'\n  - {c["model"]} / {c["solver"]} / NFE {c["nfe"]}: {c["diff"]:+.2g} ({c["se"]:.2g}) vs {start_name(c)}'
                     for c in s['loss_cells']),
             f'- refined beats its best start (diff < -SE): {won} cells',
             f'- refinement over its budget: {len(s["over_budget"])} cells',
             f'- worst ratio to UniPC + GITS: UniPC refined {ratio(s["worst_unipc_refined"])}; '
             f'best refined solver {ratio(s["worst_best_refined"])}',
             f'- every best refined ratio <= {s["target_ratio"]}: {s["all_best_within_target"]}',
             f'- total {seconds:.0f}s']
    return '\n'.join(lines)


def markdown(record):
    """{key: (title, body)} of the benchmark's markdown, from its JSON record."""
    results, nfe_list = record['results'], record['options']['nfe_list']
    o = record['options']
    sections = dict(
        headline=('Held-out RMSE to the exact solution: seed recipes, GITS and the best refined schedule',
                  headline_table(results, nfe_list)),
        recipes=('GITS README recipe against GITS (held-out RMSE, lower in bold)', recipes_table(results, nfe_list)),
        refined=('UniPC on the GITS schedule against the refined schedules (held-out RMSE; ratio to the peer)',
                 refined_table(results, nfe_list)))
    for name, res in results.items():
        sections[f'{name}-rmse'] = (f'{name}: RMSE to exact (mean over {o["num_eval"]} held-out seeds; '
                                    '+- standard error)', solver_table(res, nfe_list))
        sections[f'{name}-cost'] = (f'{name}: search cost (evaluations at NFE {", ".join(map(str, nfe_list))})',
                                    cost_table(res, nfe_list))
        sections[f'{name}-quality'] = (f'{name}: quality against UniPC on the GITS schedule (ratio to it; '
                                       'paired SE of the difference)', quality_table(res, nfe_list))
    if has_rotation(results):       # results written before the rotation schedule have none
        sections['rotation'] = ('The rotation schedule against GITS and the refined schedules (held-out RMSE; '
                                'paired difference to GITS)', rotation_table(results, nfe_list))
    for name, goals in record['summary'].get('recipes', {}).items():
        label = RECIPES[name].label
        sections[name] = (f'{label}: best solver against the best refined schedule and the peer (held-out RMSE)',
                          recipe_table(results, nfe_list, name))
        for model, res in results.items():
            sections[f'{model}-{name}'] = (f'{model}: {label} against the refined schedule of the same solver',
                                           recipe_cells_table(res, nfe_list, name))
    text = summary_text(record['summary'], record['seconds'], wins(results))
    text += ''.join('\n' + recipe_summary(name, g) for name, g in record['summary'].get('recipes', {}).items())
    sections['summary'] = ('Summary', text)
    return sections


# ----------------------------------------------------------------------------------------------

def check_options(datasets, solver_names, nfes, opts, recipe_names=''):
    """Every usage error as one UserError line, before any work."""
    opts.recipe_list = [r for r in recipe_names.split(',') if r]
    for r in opts.recipe_list:
        if r not in RECIPES:
            raise dnnlib.util.UserError(f'--recipes: unknown recipe "{r}"; choose from {", ".join(RECIPES)}')
    opts.dataset_list = [d for d in datasets.split(',') if d]
    for d in opts.dataset_list:
        if d not in models.ANALYTIC:
            raise dnnlib.util.UserError(f'--datasets: "{d}" has no exact solution; '
                                        f'choose from {", ".join(models.ANALYTIC)}')
    opts.solver_list = [s for s in solver_names.split(',') if s]
    for s in opts.solver_list:
        if s not in solvers.SOLVERS:
            raise dnnlib.util.UserError(f'--solvers: unknown solver "{s}"; choose from {", ".join(solvers.SOLVERS)}')
    if not opts.dataset_list or not opts.solver_list:
        raise dnnlib.util.UserError('--datasets, --solvers: give at least one')
    try:
        opts.nfe_list = sorted(set(misc.parse_int_list(nfes)))
    except ValueError as e:
        raise dnnlib.util.UserError(f'--nfes: {e}')
    for s in opts.solver_list:
        for n in opts.nfe_list:
            if n < 2 or layout(s, n) is None:
                raise dnnlib.util.UserError(f'--nfes: {s} cannot spend exactly {n} evaluations (NFE >= 2)')
    drawn = opts.num_warmup * (1 + student_search.CHECK_PER_WARMUP)     # warm-up and check seeds
    if opts.warmup_seed < opts.eval_seed + opts.num_eval and opts.eval_seed < opts.warmup_seed + drawn:
        raise dnnlib.util.UserError('--warmup_seed: warm-up (and check) seeds overlap the evaluation seeds')


@click.command()
@click.option('--datasets', default='digits,gmm,gmm_wavelet', show_default=True)
@click.option('--solvers', 'solver_names', default=','.join(ALL_SOLVERS), show_default=True)
@click.option('--nfes', default='3,4,5,6,8,10', show_default=True)
@click.option('--recipes', 'recipe_names', default=','.join(DEFAULT_RECIPES), show_default=True,
              help='Recipes measured beside the refinement (empty: none)')
@click.option('--num_warmup', type=click.IntRange(min=1), default=gits.NUM_WARMUP, show_default=True)
@click.option('--num_eval', type=click.IntRange(min=2), default=512, show_default=True)
@click.option('--warmup_seed', type=int, default=gits.WARMUP_SEED, show_default=True)
@click.option('--eval_seed', type=int, default=0, show_default=True)
@click.option('--num_steps_tea', type=click.IntRange(min=3), default=gits.NUM_STEPS_TEA, show_default=True)
@click.option('--solver_tea', default=gits.SOLVER_TEA, show_default=True)
@click.option('--student_grid', type=int, default=21, show_default=True, help='Candidate points of the solver-aware DP')
@click.option('--refine_budget', type=click.FloatRange(min=0, min_open=True), default=None,
              help='Refinement evaluations / teacher evaluations, for the refinement and every recipe '
                   f'[default: {student_search.REFINE_BUDGET:g}; learned: {student_search.REFINE_BUDGET_COEFFICIENTS:g}]')
@click.option('--threads', type=int, default=2, show_default=True)
@click.option('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'gits.json'),
              show_default=True, help='JSON results; the markdown tables go next to it (.md)')
def main(datasets, solver_names, nfes, recipe_names, **kw):
    """Schedule searches on the exact analytic models: RMSE to exact(), never-loses verdicts,
    quality against UniPC + GITS, and search cost."""
    opts = dnnlib.EasyDict(kw)
    check_options(datasets, solver_names, nfes, opts, recipe_names)
    torch.set_num_threads(opts.threads)
    start = time.perf_counter()
    results = {name: run_dataset(name, opts) for name in opts.dataset_list}
    summary = summarize(results)
    total = time.perf_counter() - start
    record = dict(options={k: v for k, v in opts.items()}, results=results, summary=summary, seconds=total)
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    misc.atomic_write_json(opts.out, json.loads(json.dumps(record, default=str)))
    text = render.write_markdown(opts.out, markdown)
    print('\n' + text, end='')
    print(f'Wrote {opts.out} and its markdown (.md)')


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
