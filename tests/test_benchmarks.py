"""The benchmark scripts run end to end on tiny settings and write what the README quotes from
(their full runs are long; this keeps them from rotting when the code under them changes)."""

import json
import math
import os

import pytest
import torch

import gits
import solver_utils
import solvers
import student_search
from helpers import assert_one_line_error, run_cli
from torch_utils.seeds import draw_seed_inputs


def test_gits_benchmark_small_run(tmp_path):
    out = tmp_path / 'gits.json'
    r = run_cli('benchmarks/gits.py', '--datasets=digits', '--solvers=ipndm,unipc', '--nfes=3,6', '--num_warmup=48',
                '--num_eval=16', '--num_steps_tea=21', '--threads=1', f'--out={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert (tmp_path / 'gits.md').read_text().strip() in r.stdout
    res = record['results']['digits']
    for solver in ('ipndm', 'unipc'):
        for nfe in ('3', '6'):
            row = res['solvers'][solver][nfe]
            assert row['cost']['refine_evals'] <= row['cost']['refine_budget']
            learned = row['recipes']['learned']          # issue 29: its own default budget, paired with the refined schedule
            assert learned['evals'] <= learned['budget'] == student_search.schedule_budget(
                student_search.REFINE_BUDGET_COEFFICIENTS, res['teacher']['evals'], row['cost']['check_evals'], 1)
            assert row['cost']['refine_budget'] == student_search.schedule_budget(
                student_search.REFINE_BUDGET, res['teacher']['evals'], row['cost']['check_evals'], 1)
            assert learned['outcome'] in ('kept', 'rejected', 'no step')
            assert learned['ratio_refined'] == pytest.approx(learned['rmse']['mean'] / row['rmse']['refined']['mean'])
            fit = learned['refine']          # the kept joint fit (final point or path objective), if any
            assert (learned['coefficients'] is not None) == (fit['objective'] is not None)
            if fit['objective'] is not None:
                assert learned['outcome'] == 'kept' and any(fit['offsets'])
                checked = fit['fits'][fit['objective']]
                assert fit['check']['refined'] == checked['race_check' if fit['stage'] == 'race' else 'check']
                assert fit['stage'] == 'race' or checked['continued'] > 0
            vs = row['vs_best_start']
            assert vs['verdict'] == ('LOSS' if vs['diff'] > vs['se'] else 'ok')
            assert row['outcome'] in ('kept', 'rejected', 'no step')
    for nfe in ('3', '6'):
        q = res['quality'][nfe]
        best_learned = min(('ipndm', 'unipc'), key=lambda s: res['solvers'][s][nfe]['recipes']['learned']['rmse']['mean'])
        assert q['recipes']['learned']['solver'] == best_learned
        peer = res['solvers']['unipc'][nfe]['rmse']['gits']['mean']
        assert q['peer']['mean'] == peer
        assert q['unipc_refined']['ratio'] == pytest.approx(res['solvers']['unipc'][nfe]['rmse']['refined']['mean'] / peer)
        best = min(res['solvers'], key=lambda s: res['solvers'][s][nfe]['rmse']['refined']['mean'])
        assert q['best_refined']['solver'] == best
    s = record['summary']
    goals = s['recipes']['learned']
    assert goals['cells'] == 2 and goals['gmm_wall_time_ratio'] is None      # no gmm in this run
    assert goals['all_goals_met'] is False
    assert '<!-- section:learned -->' in (tmp_path / 'gits.md').read_text()
    assert s['cells'] == 4 and s['losses'] == len(s['loss_cells'])
    assert s['kept'] + s['rejected'] + s['no_step'] == 4


def test_search_cost_benchmark_small_run(tmp_path):
    """The ratio is the search against the teacher alone; with one thread on a machine of several
    cores the matrices go to the helper thread, and the schedule is the one found without it."""
    results = {}
    for overlap in (True, False):
        out = tmp_path / f'cost_{overlap}.json'
        r = run_cli('benchmarks/search_cost.py', '--datasets=digits', '--num_warmup=16', '--batch=8',
                    '--num_steps_tea=21', '--repeats=2', f'--overlap={overlap}', f'--out={out}')
        assert r.returncode == 0, r.stderr
        results[overlap] = res = json.loads(out.read_text())['results']['digits']
        for run in res['runs']:
            assert run['ratio'] == pytest.approx(run['search'] / run['teacher'], rel=1e-12)
            assert run['search'] > run['cost'] + run['dp'] > 0
        assert res['ratio_range'][0] <= res['ratio_wall'] <= res['ratio_range'][1]
    spare = len(os.sched_getaffinity(0)) > 1
    assert (results[True]['seconds']['cost_helper'] > 0) == spare
    assert results[False]['seconds']['cost_helper'] == 0
    assert results[True]['t_steps'] == results[False]['t_steps']
    bad = tmp_path / 'bad.json'
    assert_one_line_error(run_cli('benchmarks/search_cost.py', '--overlap=maybe', f'--out={bad}'), '--overlap')
    assert not bad.exists()


def test_compat_benchmark_small_run(tmp_path):
    """Every difference row runs on both sides, and the printed table is the JSON's."""
    out = tmp_path / 'compat.json'
    r = run_cli('benchmarks/compat.py', '--models=digits', '--seeds=0-1', '--num_warmup=4', f'--out={out}')
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())['models']['digits']
    cells = [v for row in res['rows'] for pair in row['rmse'] for v in pair]
    cells += [v for row in res['short'] for v in row['rmse']]
    cells += [v for row in res['search'] for pair in row['rmse'] for v in pair if v is not None]
    assert cells and all(math.isfinite(v) and v >= 0 for v in cells)
    # Difference 4 of docs/official-differences.md: the official rhoAB reuses step 3's weights and blows up with length.
    rhoab = next(row['rmse'] for row in res['rows'] if row['options'].get('deis_mode') == 'rhoab')
    assert rhoab[-1][1] > 10 * rhoab[-1][0]
    table = [line for line in r.stdout.splitlines() if line.startswith('| ') and not line.startswith('| difference')]
    assert len(table) == len(res['rows']) + len(res['short']) + len(res['search'])
    assert any(v is not None for row in res['search'] for pair in row['rmse'] for v in pair)


def test_solvers_benchmark_small_run(tmp_path, digits):
    """Every solver x schedule row has a number for each NFE the solver can reach and '-' (None)
    exactly where it cannot (odd NFE for the two-evaluation solvers); the numbers are the RMSE to
    the exact solution, recomputed here for a few cells."""
    out = tmp_path / 'solvers.json'
    r = run_cli('benchmarks/solvers.py', '--models=digits', '--seeds=0-1', f'--out={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    nfes, rmse = record['nfes'], record['models']['digits']['rmse']
    assert sorted(rmse) == sorted(f'{s}/{k}' for s in solvers.SOLVERS for k in ('polynomial', 'logsnr', 'time_uniform'))
    for key, row in rmse.items():
        two_evals = solvers.SOLVER_SPECS[key.split('/')[0]].evals_per_step == 2
        assert [v is None for v in row] == [two_evals and nfe % 2 == 1 for nfe in nfes], key
        assert all(math.isfinite(v) and v > 0 for v in row if v is not None), key
    x = draw_seed_inputs([0, 1], digits.shape, 0)[0] * digits.sigma_max
    exact = digits.exact(x, digits.sigma_max, digits.sigma_min)
    for solver, schedule, rho, nfe, points in (('ipndm', 'polynomial', 7.0, 5, 6), ('heun', 'polynomial', 7.0, 4, 3),
                                              ('deis', 'time_uniform', 2.0, 8, 9)):
        ts = solver_utils.get_schedule(points, digits.sigma_min, digits.sigma_max, schedule, rho)
        e = (solvers.SOLVERS[solver](digits.denoise, x, ts) - exact).flatten(1).square().mean(-1).sqrt()
        assert rmse[f'{solver}/{schedule}'][nfes.index(nfe)] == pytest.approx(float(e.mean()), rel=1e-12)


def test_presets_benchmark_small_run(tmp_path, digits):
    """The four schedules are the ones the benchmark says (gits_here searched on its warm-up seeds),
    and every cell's RMSE, difference to gits_here and paired standard error are recomputed here
    from the exact solution on the held-out seeds."""
    out = tmp_path / 'presets.json'
    r = run_cli('benchmarks/presets.py', '--models=digits', '--solvers=ipndm', '--nfe=5', '--num_warmup=8',
                '--num_eval=4', f'--out={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    sigma_min, sigma_max = record['sigma_range']
    nfe_row = record['results']['digits']['rows']['5']
    schedules = {k: torch.tensor(solver_utils.parse_t_steps(v), dtype=torch.float64)
                 for k, v in nfe_row['schedules'].items()}
    assert sorted(schedules) == ['ays', 'gits_here', 'gits_table', 'polynomial']
    assert all(len(t) == 6 and float(t[0]) == pytest.approx(sigma_max) for t in schedules.values())
    warm = draw_seed_inputs(range(1_000_000, 1_000_008), digits.shape, 0)[0]
    searched = gits.search_schedule(digits.denoise, warm, num_steps=6, sigma_min=sigma_min, sigma_max=sigma_max)
    assert solver_utils.format_t_steps(searched) == nfe_row['schedules']['gits_here']
    lat = draw_seed_inputs(range(4), digits.shape, 0)[0]
    ref = digits.exact(lat * sigma_max, sigma_max, sigma_min)
    errors = {k: (solvers.SOLVERS['ipndm'](digits.denoise, lat * float(t[0]), t) - ref).flatten(1).square().mean(-1).sqrt()
              for k, t in schedules.items()}
    row = nfe_row['solvers']['ipndm']
    for name, cell in row.items():
        diff = errors[name] - errors['gits_here']
        assert cell['rmse'] == pytest.approx(float(errors[name].mean()), rel=1e-9), name
        assert cell['diff'] == pytest.approx(float(diff.mean()), rel=1e-9, abs=1e-12), name
        assert cell['se'] == pytest.approx(float(diff.std() / 2), rel=1e-9, abs=1e-12), name
        if name != 'gits_here':          # a real comparison: another schedule, other errors
            assert cell['se'] > 0 and not torch.equal(schedules[name], schedules['gits_here']), name
