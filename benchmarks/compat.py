"""Effect of each difference from the official GITS code (compat='gits-main') on the analytic
models: per-seed RMSE to the exact ODE solution, mean over seeds, at NFE 5/6/8/10, our default
vs the official variant, each difference isolated where the options allow it.

    python benchmarks/compat.py                        # gmm and digits, 32 seeds, 64 warm-ups (21 min on 2 cores)
    python benchmarks/compat.py --models=digits --seeds=0-63     # digits only: about a minute

Every solver row runs on our schedule of the solver's README recipe (the same t_steps for both
columns); the schedule row compares our and the official time_uniform schedule with our DEIS.
The short-schedule rows use 3 time points (below NFE 5), where the official warm-up and UniPC
corrector differ (both sides threshold there, to isolate the step rules). Rows where only the
thresholding differs compare thresholding=True with our default (for unipc at these lengths,
that is all of compat='gits-main').

The search rows run the paper's GITS search (61 polynomial teacher points, 'dev', coeff 1.15) on
--num_warmup warm-up seeds (disjoint from the evaluation seeds) and measure the student on the
searched schedule for each NFE: the teacher's options (the teacher solver's own defaults, as
this code ran it before, vs the student's, as the official and now our default), the afs search
(ours: exact teacher plus a free step vs the official: the teacher takes the analytical first
step; both with our solvers, so only the search differs; the official mostly keeps num_steps
points, so the same NFE takes one more num_steps), and the whole --compat=gits-main search and
sampling. Writes benchmarks/results/compat.json, prints markdown tables, and writes the docs' tables
(one a difference) to compat.md.
"""

import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib                    # noqa: E402
import render                    # noqa: E402
import gits                      # noqa: E402
import models                    # noqa: E402
import schedules                 # noqa: E402
import solvers                   # noqa: E402
from torch_utils import misc     # noqa: E402
from analytic import latents, num_points_for, parse_models_and_seeds, run_and_write   # noqa: E402

NFES = (5, 6, 8, 10)
COMPAT = 'gits-main'
WARMUP_SEED = 1_000_000_000      # sample.py's default: never an evaluation seed
RECIPES = {'ipndm_v': ('polynomial', 7.0), 'deis': ('time_uniform', 2.0), 'dpmpp': ('logsnr', 7.0),
           'unipc': ('logsnr', 7.0)}

# (difference, solver, options, ours, official): ours / official are extra keywords of the two runs.
ROWS = [
    ('dynamic thresholding', 'dpmpp', {}, {}, dict(thresholding=True)),
    ('dynamic thresholding', 'unipc', {}, {}, dict(thresholding=True)),
    ('DPM-Solver++ order 3 (3M: D2 halved)', 'dpmpp', dict(predict_x0=False), {}, dict(compat=COMPAT)),
    ('all (thresholding + 3M)', 'dpmpp', {}, {}, dict(compat=COMPAT)),
    ('iPNDM-v weights', 'ipndm_v', dict(max_order=3), {}, dict(compat=COMPAT)),
    ('iPNDM-v weights', 'ipndm_v', dict(max_order=4), {}, dict(compat=COMPAT)),
    ('DEIS tAB float32 Riemann sum', 'deis', dict(max_order=3), {}, dict(compat=COMPAT)),
    ('DEIS tAB float32 Riemann sum', 'deis', dict(max_order=4), {}, dict(compat=COMPAT)),
    ('DEIS rhoAB (steps 4+ reuse step 3)', 'deis', dict(max_order=4, deis_mode='rhoab'), {}, dict(compat=COMPAT)),
]
SD_RANGE = (0.0292, 14.6146)     # Stable Diffusion v1's sigma range
SHORT_ROWS = [   # 3 time points; both runs threshold, so only the step rules differ
    ('warm-up ignores lower_order_final', 'dpmpp', {}, dict(thresholding=True), dict(compat=COMPAT)),
    ('warm-up order + UniPC last corrector', 'unipc', {}, dict(thresholding=True), dict(compat=COMPAT)),
]


def per_seed_rmse(out, exact):
    """The project's error: per-seed RMSE, mean over seeds."""
    return float(misc.per_seed_rmse(out, exact).mean())


def run_model(model, seeds, warmup_seeds):
    x = latents(model, seeds)
    exact = model.exact(x, model.sigma_max, model.sigma_min)
    rows = []
    for difference, solver, options, ours, official in ROWS:
        schedule, rho = RECIPES[solver]
        cells = []
        for nfe in NFES:
            ts = schedules.get_schedule(num_points_for(solver, nfe), model.sigma_min, model.sigma_max, schedule, rho)
            fn = solvers.SOLVERS[solver]
            cells.append([per_seed_rmse(fn(model.denoise, x, ts, **options, **extra), exact) for extra in (ours, official)])
        rows.append(dict(difference=difference, solver=solver, options=options, official=official, schedule=schedule,
                         rmse=cells))
    cells = []
    for nfe in NFES:          # the official time_uniform schedule (float32; ends at 0.0020132), our DEIS
        n = num_points_for('deis', nfe)
        cells.append([per_seed_rmse(solvers.deis(model.denoise, x, schedules.get_schedule(
            n, model.sigma_min, model.sigma_max, 'time_uniform', 2.0, compat=compat)), exact) for compat in (None, COMPAT)])
    rows.append(dict(difference='time_uniform schedule in float32', solver='deis', options={},
                     official=dict(schedule_compat=COMPAT), schedule='time_uniform', rmse=cells))
    # DEIS tAB on Stable Diffusion's sigma range: ours interpolates in the VP time of the
    # schedule's own range, the official always in that of (0.002, 80) (and sums in float32).
    lo, hi = SD_RANGE
    x_sd = x / model.sigma_max * hi
    exact_sd = model.exact(x_sd, hi, lo)
    cells = []
    for nfe in NFES:
        ts = schedules.get_schedule(num_points_for('deis', nfe), lo, hi, 'time_uniform', 2.0)
        cells.append([per_seed_rmse(solvers.deis(model.denoise, x_sd, ts, compat=compat), exact_sd)
                      for compat in (None, COMPAT)])
    rows.append(dict(difference=f'DEIS tAB VP map of (0.002, 80) on sigma {lo}..{hi}', solver='deis', options={},
                     official=dict(compat=COMPAT), schedule='time_uniform', rmse=cells))
    short = []
    ts = schedules.get_schedule(3, model.sigma_min, model.sigma_max, 'logsnr')
    for difference, solver, options, ours, official in SHORT_ROWS:
        fn = solvers.SOLVERS[solver]
        short.append(dict(difference=difference, solver=solver, options=options, official=official,
                          nfe=[solvers.count_nfe(solver, 3, compat=extra.get('compat'), **options) for extra in (ours, official)],
                          rmse=[per_seed_rmse(fn(model.denoise, x, ts, **options, **extra), exact) for extra in (ours, official)]))
    warm = latents(model, warmup_seeds) / model.sigma_max          # standard normal, as the search takes it
    return dict(rows=rows, short=short, search=search_rows(model, x, warm))


# ----------------------------------------------------------------------------------------------
# Search-side differences.

TEA_POINTS = 61
SEARCH_NUM_STEPS = range(3, 14)        # enough lengths for NFE 5..10 with and without a free step

# (difference, student, options, afs, ours, official): ours / official are (teacher, teacher
# options or None for the student's, afs teacher, compat).
SEARCH_ROWS = [
    ('teacher options (SD recipe)', 'dpmpp', dict(max_order=2, predict_x0=False), False,
     ('dpmpp', {}, False, None), ('dpmpp', None, False, None)),
    ('teacher options', 'ipndm', dict(max_order=3), False, ('ipndm', {}, False, None), ('ipndm', None, False, None)),
    ('afs in the search', 'ipndm', dict(max_order=4), True, ('ipndm', None, False, None), ('ipndm', None, True, None)),
    ('afs in the search', 'euler', dict(max_order=4), True, ('ipndm', None, False, None), ('ipndm', None, True, None)),
    ('all of --compat=gits-main (search and sampling)', 'ipndm', dict(max_order=4), True,
     ('ipndm', None, False, None), ('ipndm', None, True, COMPAT)),
    ('all of --compat=gits-main (search and sampling)', 'dpmpp', dict(max_order=2, predict_x0=False), False,
     ('dpmpp', {}, False, None), ('dpmpp', None, False, COMPAT)),
]


def searched_schedules(model, warm, solver, options, afs, variant):
    """{NFE: t_steps} of one search variant (teacher, teacher options, afs teacher, compat),
    through gits.py's pieces: teacher runs, cost matrix and DP, free step."""
    solver_tea, teacher_options, teacher_afs, compat = variant
    student, inherited = gits.search_options(solver, solver_tea, options, compat, TEA_POINTS)
    teacher_options = inherited if teacher_options is None else solvers.resolve_options(solver_tea, teacher_options)
    wanted = list(SEARCH_NUM_STEPS)
    t_tea = gits.teacher_grid(TEA_POINTS, model.sigma_min, model.sigma_max, 'polynomial', 7.0, None, wanted, compat)
    rounds = gits.warmup_split(model.denoise, warm, 64)
    data, _, _ = gits.run_teachers(rounds, t_tea, solver_tea, teacher_afs, compat, **teacher_options)
    out = {}
    for n, path in gits.gits_paths(data, t_tea, wanted).items():
        t_steps = t_tea[path].clone()
        if afs:
            t_steps, _, _ = gits.afs_free_step(data, t_tea, path, solver, student, compat)
        nfe = solvers.count_nfe(solver, len(t_steps), afs=afs, compat=compat, **student)
        out.setdefault(nfe, (t_steps, student, teacher_options))
    return out


def search_rows(model, x, warm):
    exact = {}

    def error(solver, t_steps, afs, compat, options):
        start = float(t_steps[0])
        key = (start, float(t_steps[-1]))
        x0 = x / model.sigma_max * start
        if key not in exact:
            exact[key] = model.exact(x0, *key)
        out = solvers.SOLVERS[solver](model.denoise, x0, t_steps, afs=afs, compat=compat, **options)
        return per_seed_rmse(out, exact[key])

    rows = []
    for difference, solver, options, afs, ours, official in SEARCH_ROWS:
        found = [searched_schedules(model, warm, solver, options, afs, v) for v in (ours, official)]
        cells, points, teachers = [], [], []
        for nfe in NFES:
            pair = [f.get(nfe) for f in found]
            cells.append([None if p is None else error(solver, p[0], afs, v[3], p[1]) for p, v in zip(pair, (ours, official))])
            points.append([None if p is None else len(p[0]) for p in pair])
            teachers = [p[2] for p in pair if p is not None] or teachers
        rows.append(dict(difference=difference, solver=solver, options=options, afs=afs, ours=list(ours),
                         official=list(official), teacher_options=teachers, points=points, rmse=cells))
    return rows


def _options_text(row):
    text = ', '.join(f'{k}={v}' for k, v in row['options'].items())
    return f'{row["solver"]}' + (f' ({text})' if text else '')


def print_tables(results):
    for name, res in results['models'].items():
        print(f'\n{name}: per-seed RMSE to exact(), mean over {len(results["seeds"])} seeds; '
              f'cells: ours / official variant')
        print('| difference | solver | schedule | ' + ' | '.join(f'NFE {n}' for n in results['nfes']) + ' |')
        print('|---|---|---|' + '---|' * len(results['nfes']))
        for row in res['rows']:
            cells = ' | '.join(f'{a:.4f} / {b:.4f}' for a, b in row['rmse'])
            print(f'| {row["difference"]} | {_options_text(row)} | {row["schedule"]} | {cells} |')
        for row in res['short']:
            print(f'| {row["difference"]} (3 points, NFE {row["nfe"][0]} / {row["nfe"][1]}) | {_options_text(row)} | '
                  f'logsnr | {row["rmse"][0]:.4f} / {row["rmse"][1]:.4f} |' + ' |' * (len(results['nfes']) - 1))
        for row in res['search']:
            cells = ' | '.join(' / '.join('-' if v is None else f'{v:.4f}' for v in pair) for pair in row['rmse'])
            afs = ', afs' if row['afs'] else ''
            print(f'| {row["difference"]} | {_options_text(row)}{afs} | GITS | {cells} |')


# The docs' sections: difference (as the rows name it) -> section key, and each key's title.
SECTIONS = {
    'dynamic thresholding': 'thresholding',
    'DPM-Solver++ order 3 (3M: D2 halved)': 'dpmpp-order3',
    'all (thresholding + 3M)': 'dpmpp-order3',
    'iPNDM-v weights': 'ipndm-v',
    'DEIS tAB float32 Riemann sum': 'deis-tab-sum',
    'DEIS rhoAB (steps 4+ reuse step 3)': 'deis-rhoab',
    'time_uniform schedule in float32': 'float32-schedule',
    'warm-up ignores lower_order_final': 'short-schedules',
    'warm-up order + UniPC last corrector': 'short-schedules',
    'teacher options (SD recipe)': 'teacher-options',
    'teacher options': 'teacher-options',
    'afs in the search': 'afs-search',
    'all of --compat=gits-main (search and sampling)': 'compat-all',
}
TITLES = {
    'thresholding': 'Dynamic thresholding: ours (off) / official (always on)',
    'dpmpp-order3': 'DPM-Solver++ order 3: ours / official 3M update',
    'ipndm-v': 'iPNDM-v orders 3 and 4: ours / official weights',
    'deis-tab-sum': 'DEIS tAB coefficients: ours (quadrature) / official (float32 Riemann sum)',
    'deis-rhoab': 'DEIS rhoAB: ours / official',
    'deis-tab-map': 'DEIS tAB time map on Stable Diffusion\'s sigma range: ours / official',
    'float32-schedule': 'time_uniform schedule: ours (float64) / official (float32)',
    'short-schedules': '3-point schedules: ours / official (NFE ours / official)',
    'teacher-options': 'GITS teacher options: the teacher solver\'s own defaults / the student\'s options '
                       '(ours and the official)',
    'afs-search': 'afs in the GITS search: ours (exact teacher, free step) / official (afs teacher), same NFE',
    'compat-all': 'The whole search and sampling: ours / --compat=gits-main',
}


def section_of(difference):
    return 'deis-tab-map' if difference.startswith('DEIS tAB VP map') else SECTIONS[difference]


def markdown(results):
    """{key: (title, body)}: one table per difference, the models as rows; cells ours / official,
    per-seed RMSE to exact(), mean over the seeds."""
    nfes = results['nfes']
    head = '| model | solver | schedule | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |'
    rule = '|---|---|---|' + '---|' * len(nfes)
    short_head, short_rule = '| model | solver | NFE | RMSE |', '|---|---|---|---|'
    bodies = {}
    for name, res in results['models'].items():
        for row in res['rows']:
            cells = ' | '.join(f'{render.sig3(a)} / {render.sig3(b)}' for a, b in row['rmse'])
            bodies.setdefault(section_of(row['difference']), [head, rule]).append(
                f'| {name} | {_options_text(row)} | {row["schedule"]} | {cells} |')
        for row in res['short']:
            bodies.setdefault(section_of(row['difference']), [short_head, short_rule]).append(
                f'| {name} | {_options_text(row)} | {row["nfe"][0]} / {row["nfe"][1]} | '
                f'{render.sig3(row["rmse"][0])} / {render.sig3(row["rmse"][1])} |')
        for row in res['search']:
            cells = ' | '.join(' / '.join('-' if v is None else render.sig3(v) for v in pair) for pair in row['rmse'])
            afs = ', afs' if row['afs'] else ''
            bodies.setdefault(section_of(row['difference']), [head, rule]).append(
                f'| {name} | {_options_text(row)}{afs} | GITS | {cells} |')
    setup = (f'Per-seed RMSE to the exact solution, mean over {len(results["seeds"])} seeds; the search rows\n'
             f'search on {results["num_warmup"]} warm-up seeds (61 polynomial teacher points, dev, coeff 1.15).')
    return dict(setup=('Setup', setup), **{key: (TITLES[key], '\n'.join(lines)) for key, lines in bodies.items()})


@click.command()
@click.option('--models', 'model_names', type=str, default='gmm,digits', help='Comma-separated analytic models')
@click.option('--seeds', type=str, default='0-31', help='Seeds of the latents, e.g. 0-31')
@click.option('--num_warmup', type=click.IntRange(min=1), default=64, help='GITS warm-up seeds (from 1000000000)')
@click.option('--out', type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'compat.json'),
              help='JSON output')
def main(model_names, seeds, num_warmup, out):
    """Our solvers and search vs the official gits-main variants on the analytic models."""
    names, seed_list = parse_models_and_seeds(model_names, seeds)
    warmup_seeds = list(range(WARMUP_SEED, WARMUP_SEED + num_warmup))
    run_and_write(lambda: dict(nfes=list(NFES), seeds=seed_list, num_warmup=num_warmup, compat=COMPAT,
                               models={name: run_model(models.load(name), seed_list, warmup_seeds) for name in names}),
                  print_tables, out, markdown)


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
