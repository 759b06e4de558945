"""Solver-aware GITS and refinement: the priced step against the solvers' published formulas
(written out here, independent of solver_utils), the forward DP against brute force, the
refinement's monotonicity, budget and ordering, determinism, and the sample.py flags."""

import json
import math
import types

import pytest
import torch

import gits
import solver_utils
import solvers
import student_search
from helpers import assert_one_line_error, run_cli


@pytest.fixture(scope='module')
def teacher(digits):
    lat = torch.randn(6, *digits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_tea = solver_utils.get_schedule(13, 0.002, 80)
    data, calls, evals = gits.run_teachers([(0, digits.denoise, lat[:4]), (4, digits.denoise, lat[4:])], t_tea)
    assert calls == 2 * 12 and evals == 6 * 12
    return data, t_tea


def rmse(a, b):
    return (a - b).reshape(a.shape[0], -1).square().mean(-1).sqrt()


def direct_steps(rnd, t, denoise):
    """Each solver's step from the teacher point x_i with the teacher's history, from the
    formulas of DESIGN.md / the papers. Returns {(solver, options, path, j): x_hat}."""
    xs, D = rnd.xs, rnd.dens
    d = {k: (xs[k] - D[k]) / t[k] for k in range(len(t) - 1)}
    out = {}
    h = t[8] - t[5]                                   # ipndm order 2, history [0, 3]
    out[('ipndm', (('max_order', 2),), (0, 3, 5), 8)] = xs[5] + h * (1.5 * d[5] - 0.5 * d[3])
    h = t[9] - t[7]                                   # ipndm order 4 (fixed AB4 weights)
    out[('ipndm', (('max_order', 4),), (0, 2, 3, 5, 7), 9)] = \
        xs[7] + h * (55 * d[7] - 59 * d[5] + 37 * d[3] - 9 * d[2]) / 24
    lam = math.log(t[5] / t[8])                       # DPM-Solver++(2M), data prediction
    r = math.log(t[3] / t[5]) / lam
    w0 = -math.expm1(-lam)
    out[('dpmpp', (('max_order', 2),), (0, 3, 5), 8)] = \
        t[8] / t[5] * xs[5] + w0 * ((1 + 0.5 / r) * D[5] - 0.5 / r * D[3])
    h = t[12] - t[6]                                  # ipndm_v order 2 to the last point: variable-step AB2
    h_prev = t[6] - t[2]
    out[('ipndm_v', (('max_order', 2),), (0, 2, 6), 12)] = \
        xs[6] + h * (d[6] + h / (2 * h_prev) * (d[6] - d[2]))
    h = t[8] - t[5]                                   # heun: a real evaluation at the predictor
    x_pred = xs[5] + h * d[5]
    d_pred = (x_pred - denoise(x_pred, t[8])) / t[8]
    out[('heun', (), (0, 3, 5), 8)] = xs[5] + h * 0.5 * (d[5] + d_pred)
    t_mid = math.sqrt(t[5] * t[8])                    # DPM-Solver-2: geometric midpoint
    x_mid = xs[5] + (t_mid - t[5]) * d[5]
    out[('dpm', (), (0, 3, 5), 8)] = xs[5] + h * (x_mid - denoise(x_mid, t_mid)) / t_mid
    return out


def test_priced_step_equals_direct_computation(teacher, digits):
    data, t_tea = teacher
    t = [float(v) for v in t_tea]
    for rnd in data:
        for (solver, opts, path, j), want in direct_steps(rnd, t, digits.denoise).items():
            options = solvers.resolve_options(solver, dict(opts))
            err, evals = student_search.price_step(rnd, t_tea, list(path), j, solver, options)
            # The history steps of the sub-run drift from the teacher points; the drift is removed
            # exactly (up to round-off of O(1) values), so the step matches the direct formula.
            assert torch.allclose(err, rmse(want, rnd.xs[j]), rtol=1e-9, atol=1e-12), (solver, path, j)
            assert evals == (rnd.size if solver in ('heun', 'dpm') else 0), solver


def test_priced_step_with_afs_uses_the_analytic_slope(teacher):
    data, t_tea = teacher
    t = [float(v) for v in t_tea]
    rnd = data[0]
    err, evals = student_search.price_step(rnd, t_tea, [0], 4, 'euler', {}, afs=True)
    x0 = rnd.xs[0]
    want = x0 + (t[4] - t[0]) * x0 / math.sqrt(1 + t[0] ** 2)
    assert evals == 0
    assert torch.allclose(err, rmse(want, rnd.xs[4]), rtol=1e-12)


def test_student_dp_two_steps_is_brute_force(teacher):
    data, t_tea = teacher
    options = solvers.resolve_options('ipndm', {})
    paths, evals = student_search.student_dp(data, t_tea, 2, 'ipndm', options, coeff=1.3, grid=13)
    assert evals == 0 and sorted(paths) == [2, 3]

    def cost(path, j):
        return float(torch.cat([student_search.price_step(r, t_tea, path, j, 'ipndm', options)[0] for r in data]).mean())

    assert paths[2] == [0, 12]
    best = min(range(1, 12), key=lambda m: cost([0], m) + 1.3 * cost([0, m], 12))
    assert paths[3] == [0, best, 12]


class Counting:
    def __init__(self, denoise):
        self.denoise, self.rows = denoise, 0

    def __call__(self, x, sigma):
        self.rows += x.shape[0]
        return self.denoise(x, sigma)


@pytest.mark.parametrize('solver,subset', [('dpmpp', None), ('ipndm', 3)])
def test_refinement_is_monotone_ordered_and_within_budget(digits, solver, subset):
    lat = torch.randn(6, *digits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_tea = solver_utils.get_schedule(21, 0.002, 80)
    counter = Counting(digits.denoise)
    data, _, teacher_evals = gits.run_teachers([(0, counter, lat)], t_tea)
    counter.rows = 0
    options = solvers.resolve_options(solver, {})
    inits = {kind: solver_utils.get_schedule(5, 0.002, 80, kind, rho) for kind, rho in student_search.FIXED_SCHEDULES}
    budget = 4 * teacher_evals
    ts, info = student_search.refine_schedule(data, inits, solver, options, budget=budget, subset=subset)
    assert counter.rows == info['evals'] <= budget
    assert info['moved']                         # both cases do improve
    first = inits[info['start']]
    assert len(ts) == 5 and float(ts[0]) == float(first[0]) and float(ts[-1]) == float(first[-1])
    assert bool((ts[1:] < ts[:-1]).all())
    start = min(info['start_objectives'].values())
    assert info['start'] == min(info['start_objectives'], key=info['start_objectives'].get)
    value, _ = student_search.warmup_objective(data, ts, solver, options)
    assert value == pytest.approx(info['objective'], rel=1e-12)
    assert value <= start
    assert all(b < a for a, b in zip(info['trace'], info['trace'][1:]))     # the search part
    if subset is not None and info['moved']:     # kept only if the validation part gains too
        for lo, hi in ((0, subset), (subset, 6)):
            mine = student_search.warmup_errors(data, ts, solver, options, lo=lo, hi=hi)[0].mean()
            theirs = student_search.warmup_errors(data, first, solver, options, lo=lo, hi=hi)[0].mean()
            assert mine < theirs
    # A budget that affords only the starts leaves the best start as it is.
    small = 3 * 4 * 6
    ts2, info2 = student_search.refine_schedule(data, inits, solver, options, budget=small)
    assert info2['evals'] <= small and not info2['moved']
    assert torch.equal(ts2, inits[info2['start']])


def test_student_refined_search_is_batch_invariant(digits):
    lat = torch.randn(7, *digits.shape, generator=torch.Generator().manual_seed(2))
    kw = dict(num_steps=4, sigma_min=0.002, sigma_max=80, num_steps_tea=13, solver='unipc', search='student',
              refine=True, refine_budget=2.0, student_grid=7)
    a = student_search.search_schedule(digits.denoise, lat, **kw)
    b = student_search.search_schedule(digits.denoise, lat, batch_size=3, **kw)
    assert torch.equal(a, b)
    assert len(a) == 4 and float(a[0]) == 80 and bool((a[1:] < a[:-1]).all())
    # With afs the student search returns one more point at the same NFE, as GITS does.
    c = student_search.search_schedule(digits.denoise, lat, afs=True, **dict(kw, refine=False))
    assert len(c) == 5


def test_sample_flags_end_to_end(tmp_path):
    common = ['--dataset_name=digits', '--seeds=0-2', '--solver=ipndm', '--num_steps=5']
    r = run_cli('sample.py', *common, '--dp=True', '--search=student', '--refine=True', '--num_warmup=4',
                '--num_steps_tea=13', f'--outdir={tmp_path / "a"}')
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / 'a' / 'run.json').read_text())
    assert record['search']['search'] == 'student' and record['search']['refine']
    assert record['search']['evals']['refine'] <= 4 * record['search']['evals']['teacher']
    assert f'--t_steps={record["t_steps_text"]}' in r.stdout
    pasted = [a for a in common if not a.startswith('--num_steps')]     # the list is the whole schedule
    r2 = run_cli('sample.py', *pasted, f'--t_steps={record["t_steps_text"]}', f'--outdir={tmp_path / "b"}')
    assert r2.returncode == 0, r2.stderr
    for s in range(3):
        name = f'{s:06d}.png'
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()


@pytest.mark.parametrize('args,flag', [
    (['--dp=True', '--search=euler'], '--search'),
    (['--refine=True'], '--refine'),
    (['--search=student'], '--search'),
    (['--dp=True', '--refine=True', '--refine_budget=0'], '--refine_budget'),
])
def test_bad_refine_flags(tmp_path, args, flag):
    r = run_cli('sample.py', '--dataset_name=digits', *args, f'--outdir={tmp_path / "o"}')
    assert_one_line_error(r, flag)
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('validation_gain,kept', [(0.001, False), (50.0, True)])
def test_refinement_kept_only_if_validation_gain_beats_noise(monkeypatch, validation_gain, kept):
    """Synthetic errors: on the search half the error falls with the interior noise level, so the
    search always moves it; on the validation half the error is zero-mean schedule-dependent
    noise plus `validation_gain` times that level. A real but tiny gain, far inside the noise, must
    be rejected (start kept); a gain well beyond it kept."""
    def fake_errors(data, t_steps, solver, options, afs=False, lo=0, hi=None):
        level = float(t_steps[1])
        idx = torch.arange(32, 64, dtype=torch.float64)
        noise = torch.sin(1000 * level + idx)
        validation = validation_gain * level + noise - noise.mean()   # the mean gain is exactly real
        every = torch.cat([torch.full([32], level, dtype=torch.float64), validation])
        return every[lo:hi], 0

    monkeypatch.setattr(student_search, 'warmup_errors', fake_errors)
    data = [types.SimpleNamespace(size=64)]
    start = torch.tensor([80.0, 10.0, 0.002], dtype=torch.float64)
    ts, info = student_search.refine_schedule(data, {'start': start}, 'euler', {}, subset=32)
    assert info['moved'] is kept
    assert (float(ts[1]) < 10.0) is kept
    assert torch.equal(ts, start) is (not kept)
