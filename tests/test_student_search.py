"""Solver-aware GITS and refinement: the priced step against the solvers' published formulas
(written out here, independent of solver_utils), the forward DP against brute force, the
refinement's monotonicity, budget and ordering, determinism, and the sample.py flags."""

import json
import math

import pytest
import torch

import dnnlib
import gits
import schedules
import run_schedule
import sample
import solver_utils
import solvers
import student_search
from helpers import assert_one_line_error, run_cli, run_here, torchrun
from torch_utils import misc
from torch_utils.seeds import draw_seed_inputs


@pytest.fixture(scope='module')
def teacher(digits):
    lat = torch.randn(6, *digits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_tea = schedules.get_schedule(13, 0.002, 80)
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


@pytest.fixture(scope='module')
def refine_data(digits):
    """32 warm-up trajectories in two rounds and 16 check ones, through a denoiser that counts rows."""
    counter = Counting(digits.denoise)
    lat = torch.randn(48, *digits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_tea = schedules.get_schedule(21, 0.002, 80)
    data, _, teacher_evals = gits.run_teachers([(0, counter, lat[:20]), (20, counter, lat[20:32])], t_tea)
    check, _, _ = gits.run_teachers([(0, counter, lat[32:])], t_tea)
    return data, check, counter, teacher_evals


def fixed_inits(points):
    return {kind: schedules.get_schedule(points, 0.002, 80, kind, rho)
            for kind, rho in student_search.FIXED_SCHEDULES}


@pytest.mark.parametrize('solver', ['ipndm', 'heun', 'unipc', 'deis'])
def test_replayed_runs_equal_fresh_runs_and_skip_the_shared_prefix(teacher, digits, solver):
    data, _ = teacher
    rnd = data[0]
    options = solvers.resolve_options(solver, {})
    ts = schedules.get_schedule(6, 0.002, 80)
    tape = solver_utils.Recorder(digits.denoise, keep=True)
    base = student_search._run(tape, rnd, 0, rnd.size, ts, solver, options, False)
    assert torch.equal(base, student_search._run(digits.denoise, rnd, 0, rnd.size, ts, solver, options, False))
    for k in range(1, 5):
        moved = ts.clone()
        moved[k] *= 1.01
        fresh_counter = solver_utils.Recorder(digits.denoise)
        fresh = student_search._run(fresh_counter, rnd, 0, rnd.size, moved, solver, options, False)
        replay = student_search._Replay(digits.denoise, tape)
        assert torch.equal(student_search._run(replay, rnd, 0, rnd.size, moved, solver, options, False), fresh)
        assert 0 < replay.evals < fresh_counter.evals
        if solver == 'ipndm':        # one call per point but the last: those before t_k are replayed
            assert replay.evals == (len(ts) - 1 - k) * rnd.size


@pytest.mark.parametrize('solver,kept', [('deis', False), ('ipndm', True)])
def test_refinement_lowers_the_fit_objective_and_stays_ordered_within_budget(refine_data, solver, kept):
    data, check_data, counter, teacher_evals = refine_data
    options = solvers.resolve_options(solver, {})
    inits = fixed_inits(5)
    budget = 4 * teacher_evals
    counter.rows = 0
    ts, info = student_search.refine_schedule(data, check_data, inits, solver, options, budget=budget, batch=8)
    assert counter.rows == info['evals'] <= budget
    errors = {k: student_search.warmup_errors(data, t, solver, options)[0] for k, t in inits.items()}
    assert info['start_objectives'] == pytest.approx({k: float(e.mean()) for k, e in errors.items()}, rel=1e-12)
    # The starts within noise of the best on the warm-up set are compared again with the check set.
    checked = {k: student_search.warmup_errors(check_data, t, solver, options)[0] for k, t in inits.items()}
    finals = info['finalists']
    assert list(finals) == student_search.finalists(errors) and len(finals) < len(inits)
    assert finals == pytest.approx({k: float(torch.cat([errors[k], checked[k]]).mean()) for k in finals}, rel=1e-12)
    assert info['start'] == min(finals, key=finals.get)
    start, fit = inits[info['start']], info['fit']
    assert fit == 32 and info['check']['size'] == 16
    # Every accepted step lowers the objective on the whole fit part, and the steps chain.
    trace = info['trace']
    assert info['steps'] == len(trace) >= 3
    assert trace[0][0] == pytest.approx(float(errors[info['start']].mean()), rel=1e-12)
    assert all(after < before for before, after in trace)
    assert all(a[1] == b[0] for a, b in zip(trace, trace[1:]))
    # The check set is the other rounds: neither the starts' comparison nor the steps saw it.
    check = info['check']
    start_check, _ = student_search.warmup_errors(check_data, start, solver, options)
    assert check['start'] == pytest.approx(float(start_check.mean()), rel=1e-12)
    assert info['kept'] is kept is (check['gain'] > check['se'])
    if kept:
        fitted, _ = student_search.warmup_errors(data, ts, solver, options)
        assert float(fitted.mean()) == pytest.approx(trace[-1][1], rel=1e-12)
        checked, _ = student_search.warmup_errors(check_data, ts, solver, options)
        assert float(checked.mean()) == pytest.approx(check['refined'], rel=1e-12)
        assert len(ts) == 5 and float(ts[0]) == float(start[0]) and float(ts[-1]) == float(start[-1])
        assert bool((ts[1:] < ts[:-1]).all())
    else:
        assert torch.equal(ts, start)
    # A budget that affords only the starts leaves the best start as it is.
    small = 3 * 4 * 32
    counter.rows = 0
    ts2, info2 = student_search.refine_schedule(data, check_data, inits, solver, options, budget=small, batch=8)
    assert counter.rows == info2['evals'] <= small and info2['steps'] == 0 and not info2['kept']
    assert torch.equal(ts2, inits[info2['start']])


def test_refinement_returns_its_start_when_the_check_rejects(refine_data, monkeypatch):
    data, check_data, _, _ = refine_data
    options = solvers.resolve_options('ipndm', {})
    inits = fixed_inits(5)
    monkeypatch.setattr(student_search, 'check_verdict', lambda start, refined: (False, 0.0, 1.0))
    ts, info = student_search.refine_schedule(data, check_data, inits, 'ipndm', options, budget=2000, batch=8)
    assert info['steps'] > 0 and not info['kept']
    assert torch.equal(ts, inits[info['start']])


def test_finalists_are_the_starts_within_noise_of_the_best():
    idx = torch.arange(64, dtype=torch.float64)
    best = 1 + torch.sin(idx) ** 2
    noise = 0.1 * torch.cos(7 * idx)                                   # paired SE about 0.009
    errors = dict(far=best + 0.5, best=best, near=best + 0.01 + noise, tied=best + noise)
    assert student_search.finalists(errors) == ['best', 'tied', 'near']
    assert student_search.finalists(errors, width=0.5) == ['best', 'tied']


@pytest.mark.parametrize('gain,kept', [(0.001, False), (50.0, True)])
def test_check_verdict_keeps_only_a_gain_beyond_noise(gain, kept):
    """A real but tiny mean gain far inside the per-trajectory noise is rejected; one well beyond
    it is kept."""
    idx = torch.arange(64, dtype=torch.float64)
    noise = torch.sin(1000 * idx)
    start = 5 + torch.sin(idx)
    refined = start - 0.01 * gain + 0.1 * (noise - noise.mean())
    verdict, mean_gain, se = student_search.check_verdict(start, refined)
    assert verdict is kept
    assert mean_gain == pytest.approx(0.01 * gain, rel=1e-9)
    assert se == pytest.approx(float((start - refined).std()) / 8, rel=1e-12)


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
    # And with the refinement, which starts from the GITS paths with their free step.
    d = student_search.search_schedule(digits.denoise, lat, afs=True, **kw)
    assert len(d) == 5 and bool((d[1:] < d[:-1]).all())


def test_sample_flags_end_to_end(tmp_path):
    common = ['--dataset_name=digits', '--seeds=0-2', '--solver=ipndm', '--num_steps=5']
    r = run_cli('sample.py', *common, '--dp=True', '--search=student', '--refine=True', '--num_warmup=4',
                '--num_steps_tea=13', f'--outdir={tmp_path / "a"}')
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / 'a' / 'run.json').read_text())
    assert record['search']['search'] == 'student' and record['search']['refine']
    evals = record['search']['evals']
    # The check set: as many fresh seeds as warm-up ones, their teacher runs paid from the budget.
    assert record['search']['num_check'] == 4 and evals['check'] == evals['teacher']
    budget = int(student_search.REFINE_BUDGET * evals['teacher']) - evals['check']
    assert 0 < evals['refine'] <= budget
    line = next(x for x in r.stdout.splitlines() if x.startswith('Refinement, num_steps 5: start '))
    assert line.endswith(f'{evals["refine"]} of {budget} evaluations')
    assert f'--t_steps={record["t_steps_text"]}' in r.stdout
    pasted = [a for a in common if not a.startswith('--num_steps')]     # the list is the whole schedule
    r2 = run_cli('sample.py', *pasted, f'--t_steps={record["t_steps_text"]}', f'--outdir={tmp_path / "b"}')
    assert r2.returncode == 0, r2.stderr
    for s in range(3):
        name = f'{s:06d}.png'
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()


def run_json_on_one_and_two_processes(script, args, tmp_path):
    """run.json of `script` with `args` on one process and under a 2-process torchrun."""
    r1 = run_cli(script, *args, f'--outdir={tmp_path / "one"}')
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun(script, 2, *args, f'--outdir={tmp_path / "two"}')
    assert r2.returncode == 0, r2.stderr
    return [json.loads((tmp_path / d / 'run.json').read_text()) for d in ('one', 'two')]


def test_refined_search_is_the_same_on_two_processes(tmp_path):
    """Warm-up and check seeds split over two processes: the same starts, steps, check verdict,
    evaluations and schedule as one process."""
    args = ['--dataset_name=digits', '--seeds=0-1', '--dp=True', '--search=student', '--refine=True',
            '--refine_budget=20', '--num_warmup=10', '--batch=4', '--solver=unipc', '--num_steps=5',
            '--num_steps_tea=13']
    one, two = run_json_on_one_and_two_processes('sample.py', args, tmp_path)
    refined = one['search']['refined']['5']
    assert refined['steps'] > 0 and refined['check']['size'] == one['search']['num_check'] == 10
    assert one['search']['refined'] == two['search']['refined'] and one['search']['evals'] == two['search']['evals']
    assert one['t_steps'] == two['t_steps']


def test_kept_refinement_is_the_same_on_two_processes(tmp_path):
    """The fitted schedule itself, with the check verdict forced to keep (tests/keep_refinement.py):
    warm-up and check seeds split over two processes (and so over smaller rounds) give the same
    bits as one process. On gmm a batched einsum of the normal equations made the last digits
    differ (13.735495874028421 vs ...409), and the Levenberg-Marquardt steps carry them on."""
    args = ['--dataset_name=gmm', '--seeds=0-1', '--dp=True', '--search=student', '--refine=True',
            '--refine_budget=20', '--num_warmup=10', '--batch=4', '--solver=ipndm', '--num_steps=5',
            '--num_steps_tea=13']
    one, two = run_json_on_one_and_two_processes('tests/keep_refinement.py', args, tmp_path)
    refined = one['search']['refined']['5']
    assert refined['kept'] and refined['steps'] >= 3
    assert one['search']['refined'] == two['search']['refined']
    assert one['t_steps'] == two['t_steps']
    # The kept schedule is the fit's, not one of the starts.
    starts = [[float(t) for t in solver_utils.get_schedule(5, 0.002, 80, kind, rho)]
              for kind, rho in student_search.FIXED_SCHEDULES]
    teacher_grid = one['search']['teacher_grid']
    starts += [[teacher_grid[i] for i in path] for path in one['search']['paths']['5'].values()]
    assert one['t_steps'] not in starts


def test_normal_equations_do_not_depend_on_rounds_or_threads(gmm):
    """The IRLS normal equations of the same trajectories, in one round or in rounds of 1 and 3
    (as more processes split them), on 1 or 2 threads: the same bits; and they are the sums of
    J^T J / |r| and J^T r / |r| of the definition."""
    lat = torch.randn(4, *gmm.shape, generator=torch.Generator().manual_seed(3))
    t_tea = solver_utils.get_schedule(13, 0.002, 80)
    ts = solver_utils.get_schedule(5, 0.002, 80)
    options = solvers.resolve_options('ipndm', {})
    threads = torch.get_num_threads()
    got = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for split in ([4], [1, 3]):
                rounds, first = [], 0
                for size in split:
                    rounds.append((first, gmm.denoise, lat[first:first + size]))
                    first += size
                data, _, _ = gits.run_teachers(rounds, t_tea)
                A, g, _ = student_search._normal_equations(data, ts, 'ipndm', options, False, 0, 4)
                got.append((A, g))
    finally:
        torch.set_num_threads(threads)
    for A, g in got[1:]:
        assert torch.equal(A, got[0][0]) and torch.equal(g, got[0][1])
    # The definition, one trajectory at a time: forward differences of the final point.
    data, _, _ = gits.run_teachers([(0, gmm.denoise, lat)], t_tea)
    rnd = data[0]
    u = ts[1:-1].log()
    steps = student_search.FD_STEP * torch.minimum(ts[:-2].log() - u, u - ts[2:].log())
    base = student_search._run(gmm.denoise, rnd, 0, 4, ts, 'ipndm', options, False).double().flatten(1)
    cols = []
    for k in range(3):
        moved = u.clone()
        moved[k] += steps[k]
        x = student_search._run(gmm.denoise, rnd, 0, 4, student_search._with_interior(ts, moved), 'ipndm',
                                options, False)
        cols.append((x.double().flatten(1) - base) / steps[k])
    jac = torch.stack(cols, -1)
    res = base - rnd.xs[-1].double().flatten(1)
    w = 1 / res.norm(dim=1)
    A_ref = sum(jac[m].T @ jac[m] * w[m] for m in range(4))
    g_ref = sum(jac[m].T @ res[m] * w[m] for m in range(4))
    torch.testing.assert_close(got[0][0], A_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(got[0][1], g_ref, rtol=1e-10, atol=0)


def test_check_set_is_the_seeds_after_the_warmup_ones(tmp_path, digits, monkeypatch):
    """The refinement's verdict is decided by the teacher runs of the check seeds, the num_warmup
    seeds after the warm-up ones (never a warm-up seed), and by nothing else: the per-trajectory
    errors the verdict gets are recomputed here, from those seeds' noise, for the start and the
    refined schedule. The verdict is forced to keep, so the refined schedule is the run's."""
    seen = []

    def verdict(start_errors, refined_errors):
        seen.append((start_errors, refined_errors))
        return True, 0.0, 0.0

    monkeypatch.setattr(student_search, 'check_verdict', verdict)
    num_warmup, first = 5, 1000
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', '--solver=ipndm', '--num_steps=5', '--dp=True',
                 '--refine=True', f'--num_warmup={num_warmup}', f'--warmup_seed={first}', '--num_steps_tea=13',
                 '--batch=3', f'--outdir={tmp_path}')
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / 'run.json').read_text())
    search, refined = record['search'], record['search']['refined']['5']
    assert len(seen) == 1 and refined['kept'] and refined['steps'] > 0
    assert search['num_check'] == refined['check']['size'] == num_warmup * student_search.CHECK_PER_WARMUP
    t_tea = torch.tensor(search['teacher_grid'], dtype=torch.float64)
    options = solvers.resolve_options('ipndm', {})
    starts = {kind: solver_utils.get_schedule(5, 0.002, 80, kind, rho) for kind, rho in student_search.FIXED_SCHEDULES}
    starts.update({name: t_tea[path] for name, path in search['paths']['5'].items()})
    schedules = dict(start=starts[refined['start']], refined=torch.tensor(record['t_steps'], dtype=torch.float64))

    def errors(seeds, t_steps):
        noise = draw_seed_inputs(seeds, digits.shape, 0)[0].float()          # sample.py's float32 noise
        xs, _, _, _ = gits.teacher_run(digits.denoise, noise, t_tea, 'ipndm', **search['teacher_options'])
        out = solvers.ipndm(digits.denoise, noise * float(t_steps[0]), t_steps, **options)
        return misc.per_seed_rmse(out, xs[-1])

    check_seeds = range(first + num_warmup, first + num_warmup + search['num_check'])
    for got, key in zip(seen[0], ('start', 'refined')):
        torch.testing.assert_close(got, errors(check_seeds, schedules[key]), rtol=1e-12, atol=0)
        # The warm-up seeds give other errors: the check is not the fit's own data.
        assert not torch.allclose(got, errors(range(first, first + num_warmup), schedules[key]), rtol=1e-3)


def test_warmup_and_check_rounds_split_over_ranks(digits, monkeypatch):
    """run_schedule's rounds: the warm-up seeds and then the check seeds, each seed's noise its
    own, the rounds of all ranks together covering each seed once, indexed from 0 in seed order."""
    opts = dnnlib.EasyDict(warmup_seed=50, num_warmup=7, batch=4, class_idx=None, refine=True)
    for world in (1, 2, 3):
        monkeypatch.setattr(run_schedule.dist, 'get_world_size', lambda: world)
        for rounds_of, base in ((run_schedule.warmup_rounds, 50), (run_schedule.check_rounds, 57)):
            index, noise = [], []
            for rank in range(world):
                monkeypatch.setattr(run_schedule.dist, 'get_rank', lambda: rank)
                for first, _, lat in rounds_of(digits, opts, 'cpu'):
                    index += range(first, first + len(lat))
                    noise.append(lat)
            order = sorted(range(len(index)), key=index.__getitem__)
            assert sorted(index) == list(range(7)), (world, base)
            want = draw_seed_inputs(range(base, base + 7), digits.shape, 0)[0].float()
            assert torch.equal(torch.cat(noise)[order], want), (world, base)
    assert run_schedule.check_rounds(digits, dnnlib.EasyDict(opts, refine=False), 'cpu') == []


@pytest.mark.parametrize('args,flag', [
    (['--dp=True', '--search=euler'], '--search'),
    (['--refine=True'], '--refine'),
    (['--search=student'], '--search'),
    (['--dp=True', '--refine=True', '--refine_budget=0'], '--refine_budget'),
    (['--dp=True', '--refine=True', '--refine_budget=0.01', '--num_warmup=4', '--num_steps_tea=13'], '--refine_budget'),
    # The check seeds (4-7) follow the warm-up seeds (0-3) and must not overlap --seeds either.
    (['--dp=True', '--refine=True', '--num_warmup=4', '--warmup_seed=0', '--seeds=5-6'], '--warmup_seed'),
])
def test_bad_refine_flags(tmp_path, args, flag):
    r = run_cli('sample.py', '--dataset_name=digits', *args, f'--outdir={tmp_path / "o"}')
    assert_one_line_error(r, flag)
    assert not (tmp_path / 'o').exists()
