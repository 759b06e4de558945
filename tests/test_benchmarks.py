"""The benchmark scripts run end to end on tiny settings and write what the README quotes from
(their full runs are long; this keeps them from rotting when the code under them changes)."""

import json
import math
import os

import pytest

from helpers import assert_one_line_error, run_cli


def test_gits_benchmark_small_run(tmp_path):
    out = tmp_path / 'gits.json'
    r = run_cli('benchmarks/gits.py', '--datasets=digits', '--solvers=ipndm,unipc', '--nfes=5,6', '--num_warmup=48',
                '--num_eval=16', '--num_steps_tea=21', '--threads=1', f'--out={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert (tmp_path / 'gits.md').read_text().strip() in r.stdout
    res = record['results']['digits']
    for solver in ('ipndm', 'unipc'):
        for nfe in ('5', '6'):
            row = res['solvers'][solver][nfe]
            assert row['cost']['refine_evals'] <= row['cost']['refine_budget']
            vs = row['vs_best_start']
            assert vs['verdict'] == ('LOSS' if vs['diff'] > vs['se'] else 'ok')
            assert row['outcome'] in ('kept', 'rejected', 'no step')
    for nfe in ('5', '6'):
        q = res['quality'][nfe]
        peer = res['solvers']['unipc'][nfe]['rmse']['gits']['mean']
        assert q['peer']['mean'] == peer
        assert q['unipc_refined']['ratio'] == pytest.approx(res['solvers']['unipc'][nfe]['rmse']['refined']['mean'] / peer)
        best = min(res['solvers'], key=lambda s: res['solvers'][s][nfe]['rmse']['refined']['mean'])
        assert q['best_refined']['solver'] == best
    s = record['summary']
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
    # The README's difference 4: the official rhoAB reuses step 3's weights and blows up with length.
    rhoab = next(row['rmse'] for row in res['rows'] if row['options'].get('deis_mode') == 'rhoab')
    assert rhoab[-1][1] > 10 * rhoab[-1][0]
    table = [line for line in r.stdout.splitlines() if line.startswith('| ') and not line.startswith('| difference')]
    assert len(table) == len(res['rows']) + len(res['short']) + len(res['search'])
    assert any(v is not None for row in res['search'] for pair in row['rmse'] for v in pair)


def test_solvers_benchmark_small_run(tmp_path):
    out = tmp_path / 'solvers.json'
    r = run_cli('benchmarks/solvers.py', '--models=digits', '--seeds=0-1', f'--out={out}')
    assert r.returncode == 0, r.stderr
    rmse = json.loads(out.read_text())['models']['digits']['rmse']
    assert rmse['ipndm/polynomial'] and all(v is None or v >= 0 for v in rmse['ipndm/polynomial'])


def test_presets_benchmark_small_run(tmp_path):
    out = tmp_path / 'presets.json'
    r = run_cli('benchmarks/presets.py', '--models=digits', '--solvers=ipndm', '--nfe=5', '--num_warmup=8',
                '--num_eval=4', f'--out={out}')
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())['results']['digits']['rows']['5']['solvers']['ipndm']
    assert row['gits_here']['diff'] == 0 and row['gits_here']['se'] == 0      # the reference against itself
    for name, cell in row.items():
        assert cell['diff'] == pytest.approx(cell['rmse'] - row['gits_here']['rmse'], abs=1e-12), name
