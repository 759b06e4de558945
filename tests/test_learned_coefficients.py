"""Issue 29: learned solver coefficients. The analytic table passed explicitly is today's solver bit
for bit (and a changed weight changes the run exactly as the update says); the joint fit lowers its
objective on the warm-up set and a result the check set does not confirm is rejected; schedule
files with coefficients round-trip into sample.py and run.json, and mismatched files and
inapplicable flags are refused in one line."""

import json

import pytest
import torch

import gits
import run_schedule
import sample
import schedules
import solver_utils
import solvers
import student_search
from helpers import assert_one_line_error, run_here

MULTISTEP = [('ipndm', dict(max_order=4)), ('ipndm', dict(max_order=2)), ('ipndm_v', dict(max_order=3)),
             ('deis', dict(max_order=4)), ('deis', dict(max_order=2, deis_mode='rhoab')),
             ('dpmpp', dict(max_order=3)), ('dpmpp', dict(max_order=2, predict_x0=False)),
             ('unipc', dict(max_order=3)), ('unipc', dict(max_order=2, variant='bh1')), ('unipc', dict(max_order=1))]


@pytest.mark.parametrize('afs', [False, True])
@pytest.mark.parametrize('solver,options', MULTISTEP)
def test_analytic_coefficients_passed_explicitly_are_bit_identical(gmm, solver, options, afs):
    x = torch.randn(3, *gmm.shape, generator=torch.Generator().manual_seed(2)) * 80
    ts = schedules.get_schedule(6, 0.002, 80, 'logsnr')
    fn = solvers.SOLVERS[solver]
    today = fn(gmm.denoise, x, ts, afs=afs, return_inters=True, **options)[1]
    analytic = solvers.analytic_coefficients(solver, ts, **options)
    assert json.loads(json.dumps(analytic)) == analytic           # what schedule files and run.json store
    explicit = fn(gmm.denoise, x, ts, afs=afs, return_inters=True, coefficients=analytic, **options)[1]
    assert torch.equal(explicit, today)
    # Evaluation noise levels equal to the schedule's: the same run too.
    outputs = len(analytic['predictor'])
    same = fn(gmm.denoise, x, ts, afs=afs, return_inters=True, coefficients=dict(analytic, sigmas=ts[:outputs].tolist()),
              **options)[1]
    assert torch.equal(same, today)
    # The table is used: a changed last-step weight moves only the last point, by that change times
    # the output it weights (the model output at the second-to-last point, in the solver's form).
    changed = json.loads(json.dumps(analytic))
    changed['predictor'][-1][0] += 0.25
    moved = fn(gmm.denoise, x, ts, afs=afs, return_inters=True, coefficients=changed, **options)[1]
    assert torch.equal(moved[:-1], today[:-1])
    if solver == 'unipc':       # its newest output is the one at the predicted (uncorrected) point: linear in it
        changed['predictor'][-1][0] += 0.25
        twice = fn(gmm.denoise, x, ts, afs=afs, coefficients=changed, **options)
        torch.testing.assert_close(twice - today[-1], 2 * (moved[-1] - today[-1]), rtol=1e-3, atol=1e-4)
        assert (moved[-1] - today[-1]).abs().max() > 1e-3
        return
    D = gmm.denoise(today[-2], float(ts[-2]))
    m = D if options.get('predict_x0', solver == 'dpmpp') else (today[-2] - D) / float(ts[-2])
    torch.testing.assert_close(moved[-1] - today[-1], 0.25 * m, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('solver,options', [('ipndm', {}), ('dpmpp', {}), ('unipc', dict(max_order=2))])
def test_evaluation_sigmas_move_only_the_denoiser_calls(gmm, solver, options):
    """sigmas[j] is the noise level the denoiser sees for the output at t_j, and nothing else: the
    run equals the analytic solver on a denoiser that maps t_j to s_j."""
    x = torch.randn(3, *gmm.shape, generator=torch.Generator().manual_seed(4)) * 80
    ts = schedules.get_schedule(6, 0.002, 80, 'logsnr')
    analytic = solvers.analytic_coefficients(solver, ts, **options)
    sigmas = [float(t) * (1 + 0.1 * (j % 3 - 1)) for j, t in enumerate(ts[:len(analytic['predictor'])])]
    seen = []

    def recorded(x, sigma):
        seen.append(float(sigma))
        return gmm.denoise(x, sigma)
    shifted = solvers.SOLVERS[solver](recorded, x, ts, coefficients=dict(analytic, sigmas=sigmas), **options)
    assert seen == sigmas
    moved = dict(zip(ts[:len(sigmas)].tolist(), sigmas))
    mapped = solvers.SOLVERS[solver](lambda x, sigma: gmm.denoise(x, moved[float(sigma)]), x, ts, **options)
    assert torch.equal(shifted, mapped)
    assert not torch.equal(shifted, solvers.SOLVERS[solver](gmm.denoise, x, ts, **options))


def test_coefficient_tables_of_another_shape_are_refused(gmm):
    x = torch.randn(2, *gmm.shape) * 80
    ts = schedules.get_schedule(5, 0.002, 80)
    order2 = solvers.analytic_coefficients('ipndm', ts, max_order=2)
    with pytest.raises(ValueError, match='predictor step 2'):          # order 3 wants 3 weights on step 2
        solvers.ipndm(gmm.denoise, x, ts, max_order=3, coefficients=order2)
    with pytest.raises(ValueError, match='rows'):                      # a schedule of another length
        solvers.ipndm(gmm.denoise, x, ts[1:], max_order=2, coefficients=order2)
    for sigmas in (ts[:3].tolist(), [80.0, 10.0, -1.0, 0.1]):          # one per output (4), all positive
        with pytest.raises(ValueError, match='sigmas must be 4 positive'):
            solvers.ipndm(gmm.denoise, x, ts, max_order=2, coefficients=dict(order2, sigmas=sigmas))
    shifted = [float(t) for t in ts[:4]]
    shifted[0] /= 2
    solvers.ipndm(gmm.denoise, x, ts, max_order=2, coefficients=dict(order2, sigmas=shifted))
    with pytest.raises(ValueError, match='with afs the first output is not evaluated'):   # s_0 would be ignored
        solvers.ipndm(gmm.denoise, x, ts, max_order=2, afs=True, coefficients=dict(order2, sigmas=shifted))
    with pytest.raises(ValueError, match='with afs the first output is not evaluated'):   # a schedule file's check
        run_schedule.checked_coefficients('ipndm', ts, dict(max_order=2), dict(order2, sigmas=shifted), afs=True)
    assert run_schedule.checked_coefficients('ipndm', ts, dict(max_order=2), dict(order2, sigmas=shifted))
    with pytest.raises(ValueError, match='parts'):                     # unipc's table has a corrector
        solvers.unipc(gmm.denoise, x, ts, max_order=2, coefficients=solvers.analytic_coefficients('dpmpp', ts, max_order=2))


@pytest.fixture(scope='module')
def fit_data(digits):
    """32 warm-up trajectories in two rounds and 32 check ones (digits, 21-point teacher)."""
    lat = torch.randn(64, *digits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t_tea = schedules.get_schedule(21, 0.002, 80)
    data, _, teacher_evals = gits.run_teachers([(0, digits.denoise, lat[:20]), (20, digits.denoise, lat[20:32])], t_tea)
    check, _, _ = gits.run_teachers([(0, digits.denoise, lat[32:])], t_tea)
    return data, check, teacher_evals


@pytest.mark.parametrize('solver', ['ipndm', 'unipc'])
def test_the_fit_lowers_its_objective_and_the_check_decides(fit_data, solver, monkeypatch):
    data, check, teacher_evals = fit_data
    options = solvers.resolve_options(solver, {})
    inits = {kind: schedules.get_schedule(4, 0.002, 80, kind, rho) for kind, rho in student_search.FIXED_SCHEDULES}
    budget = 30 * teacher_evals     # room for joint steps after the points alone stall
    ts, info = student_search.refine_schedule(data, check, inits, solver, options, budget=budget, batch=16,
                                              coefficients=True)
    assert info['evals'] <= budget and info['steps'] >= 2
    start = inits[info['start']]
    # The objective on the warm-up set, recomputed from the result: below the start's, as the trace says.
    offsets = torch.tensor(info['offsets'], dtype=torch.float64)
    assert offsets.abs().max() > 0
    analytic = solvers.analytic_coefficients(solver, start, **options)
    slots = student_search.coefficient_slots(analytic)
    weights = sum(len(r) for part in ('predictor', 'corrector') for r in analytic.get(part, []) if r is not None)
    assert len(offsets) == len(slots) == weights + len(start) - 1      # and one noise level per evaluation
    assert [slot for slot in slots if slot[0] == 'sigmas'] == [('sigmas', j, 0) for j in range(len(start) - 1)]
    trace = info['trace']
    assert all(after < before for before, after in trace)
    assert info['kept'], info['check']            # digits at 3 steps: learned weights beat the start clearly
    learned = info['coefficients']
    assert learned != solvers.analytic_coefficients(solver, ts, **options)
    fitted, _ = student_search.warmup_errors(data, ts, solver, dict(options, coefficients=learned))
    begun, _ = student_search.warmup_errors(data, start, solver, options)
    assert float(fitted.mean()) == pytest.approx(trace[-1][1], rel=1e-12)
    assert float(fitted.mean()) < float(begun.mean())
    assert trace[0][0] == pytest.approx(float(begun.mean()), rel=1e-12)
    checked, _ = student_search.warmup_errors(check, ts, solver, dict(options, coefficients=learned))
    assert float(checked.mean()) == pytest.approx(info['check']['refined'], rel=1e-12)
    # The same fit, with a check set that does not confirm it: the start, analytic weights.
    monkeypatch.setattr(student_search, 'check_verdict', lambda start, refined: (False, 0.0, 1.0))
    ts2, info2 = student_search.refine_schedule(data, check, inits, solver, options, budget=budget, batch=16,
                                                coefficients=True)
    assert info2['steps'] == info['steps'] and not info2['kept'] and info2['coefficients'] is None
    assert torch.equal(ts2, start)
    # A check that confirms the points alone but not the learned weights on top of them: the
    # points-alone result, analytic weights (never the start when the first stage was confirmed).
    assert 0 < info['joint_steps'] < info['steps']
    judged = []

    def first_stage_only(start_errors, refined_errors):
        judged.append(refined_errors)
        return len(judged) == 1, 0.0, 1.0
    monkeypatch.setattr(student_search, 'check_verdict', first_stage_only)
    ts3, info3 = student_search.refine_schedule(data, check, inits, solver, options, budget=budget, batch=16,
                                                coefficients=True)
    assert len(judged) == 2 and info3['kept'] and info3['coefficients'] is None
    assert 'kept' in run_schedule.refinement_line(4, info3) and 'analytic coefficients' in run_schedule.refinement_line(4, info3)
    assert f"with learned coefficients, final objective, {info['stage']})" in run_schedule.refinement_line(4, info)
    assert info3['check_points_alone']['kept'] and info3['evals'] <= budget
    assert not torch.equal(ts3, start) and not torch.equal(ts3, ts)
    alone_check, _ = student_search.warmup_errors(check, ts3, solver, options)
    assert torch.equal(alone_check, judged[0])


def test_lm_steps_keep_noise_level_shifts_bounded():
    """A step that would move an evaluation's noise level by more than a factor e^MAX_LOG_SHIFT is
    shortened until it does not (unbounded, a path fit overflowed exp); the weights are not bound."""
    ts = schedules.get_schedule(4, 0.002, 80)
    offsets = torch.zeros(3, dtype=torch.float64)                 # [weight, noise level, weight]
    shifts = torch.tensor([False, True, False])
    A = torch.eye(5, dtype=torch.float64)
    g = torch.tensor([0, 0, -10.0, -50.0, -10.0], dtype=torch.float64)     # wants +10, +50, +10
    free = student_search._lm_step(ts, A, g, 0.0, offsets)[1]
    assert float(free[1]) == pytest.approx(50.0)
    ts2, bounded = student_search._lm_step(ts, A, g, 0.0, offsets, shifts)
    torch.testing.assert_close(ts2, ts)                            # the points had no step
    assert abs(float(bounded[1])) <= student_search.MAX_LOG_SHIFT
    torch.testing.assert_close(bounded, free * float(bounded[1]) / float(free[1]))   # the same direction, shortened


def test_teacher_state_is_the_hermite_interpolant_of_the_teacher_run():
    """Exact for a trajectory cubic in t (points and slopes from it), the grid points themselves
    on the grid; linear in the last interval, which has no slope at its end."""
    t_tea = schedules.get_schedule(9, 0.002, 80)
    coef = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def x(t):
        return coef[0] + coef[1] * t + coef[2] * t ** 2 + coef[3] * t ** 3
    xs = torch.stack([x(float(t)) for t in t_tea])
    ds = torch.stack([coef[1] + 2 * coef[2] * float(t) + 3 * coef[3] * float(t) ** 2 for t in t_tea[:-1]])
    rnd = gits.TeacherRound(0, None, xs[0], xs, ds, ds)
    for k in range(len(t_tea) - 2):
        for s in (0.25, 0.5, 0.9):
            t = float(t_tea[k]) + s * float(t_tea[k + 1] - t_tea[k])
            torch.testing.assert_close(student_search.teacher_state(rnd, t_tea, t), x(t), rtol=1e-9, atol=1e-9)
    for k, t in enumerate(t_tea):
        assert torch.equal(student_search.teacher_state(rnd, t_tea, float(t)), xs[k])
    t = float(t_tea[-2] + t_tea[-1]) / 2
    torch.testing.assert_close(student_search.teacher_state(rnd, t_tea, t, 1, 2), (xs[-2, 1:2] + xs[-1, 1:2]) / 2)


def test_the_path_objective_weighs_the_interior_states(fit_data):
    """The teacher's own run has path error 0; a student's path error adds its interior states'
    weighted differences from the teacher's to its final point's error."""
    data, check, _ = fit_data
    t_tea = schedules.get_schedule(21, 0.002, 80)
    options = solvers.resolve_options('ipndm', {})
    own, _ = student_search.warmup_errors(data, t_tea, 'ipndm', options, path_grid=t_tea)
    assert float(own.abs().max()) == 0
    ts = schedules.get_schedule(5, 0.002, 80)
    final, _ = student_search.warmup_errors(data, ts, 'ipndm', options)
    path, _ = student_search.warmup_errors(data, ts, 'ipndm', options, path_grid=t_tea)
    rnd = data[0]
    with torch.no_grad():
        states = solvers.ipndm(rnd.denoise, rnd.latents * 80, ts, return_inters=True, **options)[1]
    size = rnd.xs[-1, 0].numel()
    expected = (states[-1] - rnd.xs[-1]).double().flatten(1).square().sum(1)
    for k in range(1, len(ts) - 1):
        target = student_search.teacher_state(rnd, t_tea, float(ts[k]))
        weight = student_search.PATH_WEIGHT / max(float(ts[k]), 1.0)
        expected = expected + weight ** 2 * (states[k] - target).double().flatten(1).square().sum(1)
    torch.testing.assert_close(path[:rnd.size], (expected / size).sqrt(), rtol=1e-9, atol=0)
    assert bool((path > final).all())


@pytest.mark.parametrize('solver', ['ipndm', 'unipc'])
def test_the_path_fit_lowers_its_objective_and_the_check_picks_the_better_fit(fit_data, solver, monkeypatch):
    data, check, teacher_evals = fit_data
    t_tea = schedules.get_schedule(21, 0.002, 80)
    options = solvers.resolve_options(solver, {})
    inits = {kind: schedules.get_schedule(4, 0.002, 80, kind, rho) for kind, rho in student_search.FIXED_SCHEDULES}
    budget = 30 * teacher_evals
    monkeypatch.setattr(student_search, 'JOINT_FITS', ('path',))        # the path fit alone, never paused: its trace
    monkeypatch.setattr(student_search, 'RACE_SHARE', 1.0)
    ts, info = student_search.refine_schedule(data, check, inits, solver, options, budget=budget, batch=16,
                                              coefficients=True, teacher_grid=t_tea)
    assert info['evals'] <= budget and list(info['fits']) == ['path'] and info['fits']['path']['steps'] > 0
    joint = info['trace'][-info['joint_steps']:]
    assert all(after < before for before, after in joint)
    offsets = torch.tensor(info['offsets'], dtype=torch.float64)
    learned = student_search.learned_coefficients(solver, ts, options, offsets)
    fitted, _ = student_search.warmup_errors(data, ts, solver, dict(options, coefficients=learned), path_grid=t_tea)
    assert float(fitted.mean()) == pytest.approx(joint[-1][1], rel=1e-12)      # the path objective, lowered
    if info['kept']:
        assert info['objective'] == 'path' and info['coefficients'] == learned
    # Both fits race from the points-alone result, and the one with the lower check error goes on
    # (unless it stalled); a check that keeps anything: the fit with the lower check error in the end
    # is kept, and says so.
    monkeypatch.setattr(student_search, 'JOINT_FITS', ('final', 'path'))
    monkeypatch.setattr(student_search, 'RACE_SHARE', 0.5)
    monkeypatch.setattr(student_search, 'check_verdict', lambda start, refined: (True, 0.0, 1.0))
    ts2, info2 = student_search.refine_schedule(data, check, inits, solver, options, budget=budget, batch=16,
                                                coefficients=True, teacher_grid=t_tea)
    fits = info2['fits']
    assert set(fits) == {'final', 'path'} and all(fit['steps'] > 0 for fit in fits.values())
    assert info2['joint_steps'] == sum(fit['steps'] for fit in fits.values()) and info2['evals'] <= budget
    leader = min(fits, key=lambda name: fits[name]['race_check'])
    for name, fit in fits.items():
        assert (fit['check'] == fit['race_check']) == (fit['continued'] == 0)
        assert name == leader or fit['continued'] == 0
    # Every fit where the race paused it and the leader where it stopped are candidates: the lowest
    # check error among them is kept, and says which it is.
    measured = {(name, 'race'): fit['race_check'] for name, fit in fits.items()}
    measured.update({(name, 'resumed'): fit['check'] for name, fit in fits.items() if fit['continued']})
    best = min(measured, key=measured.get)
    assert (info2['objective'], info2['stage']) == best and info2['check']['refined'] == measured[best]
    checked, _ = student_search.warmup_errors(check, ts2, solver, dict(options, coefficients=info2['coefficients']))
    assert float(checked.mean()) == pytest.approx(measured[best], rel=1e-12)
    # Without the teacher grid, the final point's fit alone (as before the path objective).
    _, info3 = student_search.refine_schedule(data, check, inits, solver, options, budget=budget, batch=16,
                                              coefficients=True)
    assert list(info3['fits']) == ['final'] and info3['objective'] in ('final', None)


def test_a_fit_the_race_pauses_resumes_where_it_stopped(fit_data, monkeypatch):
    """The race's leader resumes with its damping and its place in the Jacobian batches: its steps are
    those of the same fit run without a pause (the traces agree step for step)."""
    data, check, teacher_evals = fit_data
    options = solvers.resolve_options('unipc', {})
    inits = {'polynomial': schedules.get_schedule(4, 0.002, 80)}
    kw = dict(budget=30 * teacher_evals, batch=12, coefficients=True)
    monkeypatch.setattr(student_search, 'RACE_STEPS', 1)
    monkeypatch.setattr(student_search, 'RACE_SHARE', 1.0)        # one fit, the whole budget: no pause
    _, whole = student_search.refine_schedule(data, check, inits, 'unipc', options, **kw)
    monkeypatch.setattr(student_search, 'RACE_SHARE', 0.2)        # paused about halfway, then resumed
    _, paused = student_search.refine_schedule(data, check, inits, 'unipc', options, **kw)
    fit = paused['fits']['final']
    assert whole['fits']['final']['continued'] == 0 and fit['continued'] >= 2
    raced = paused['steps'] - fit['continued']
    assert paused['trace'] == whole['trace'] and raced + 2 <= len(whole['trace'])
    assert fit['check'] == whole['fits']['final']['check'] != fit['race_check']


def test_joint_fits_end_when_they_stall(fit_data, monkeypatch):
    """Without a budget, each joint fit ends after three steps in a row that gain less than STALL_GAIN
    (relative), and a race leader that stalled does not go on; with no stall threshold the same fits
    crawl on to max_steps."""
    data, check, _ = fit_data
    t_tea = schedules.get_schedule(21, 0.002, 80)
    options = solvers.resolve_options('ipndm', {})
    inits = {'polynomial': schedules.get_schedule(4, 0.002, 80)}
    kw = dict(budget=None, batch=16, coefficients=True, teacher_grid=t_tea, max_steps=120)
    _, info = student_search.refine_schedule(data, check, inits, 'ipndm', options, **kw)
    assert set(info['fits']) == {'final', 'path'} and info['steps'] < kw['max_steps']
    assert all(fit['continued'] == 0 and fit['check'] == fit['race_check'] for fit in info['fits'].values())
    monkeypatch.setattr(student_search, 'STALL_GAIN', 0.0)
    _, crawl = student_search.refine_schedule(data, check, inits, 'ipndm', options, **kw)
    assert crawl['steps'] == kw['max_steps']


@pytest.mark.parametrize('afs', [False, True])
@pytest.mark.parametrize('solver', ['ipndm', 'unipc'])
def test_jacobian_columns_cost_at_most_their_slot_cost(fit_data, solver, afs):
    """The budget's estimate of a joint Jacobian never undercounts: a column of a weight or a noise
    level replays the base run up to the first evaluation it changes and pays the rest, at most
    slot_cost evaluations a trajectory (exactly, for a noise level)."""
    data, _, _ = fit_data
    rnd = data[0]
    options = solvers.resolve_options(solver, {})
    ts = schedules.get_schedule(6, 0.002, 80, 'logsnr')
    nfe = solvers.count_nfe(solver, len(ts), afs)
    slots = student_search.coefficient_slots(solvers.analytic_coefficients(solver, ts, **options), afs)
    assert len([s for s in slots if s[0] == 'sigmas']) == len(ts) - 1 - int(afs)
    base = torch.zeros(len(slots), dtype=torch.float64)
    tape = solver_utils.Recorder(rnd.denoise, keep=True)
    student_search._run(tape, rnd, 0, 4, ts, solver, student_search._with_coefficients(options, solver, ts, base, afs), afs)
    assert tape.evals == 4 * nfe
    for k, slot in enumerate(slots):
        moved = base.clone()
        moved[k] += 0.01
        replay = student_search._Replay(rnd.denoise, tape)
        student_search._run(replay, rnd, 0, 4, ts, solver, student_search._with_coefficients(options, solver, ts, moved, afs),
                            afs)
        cost = student_search.slot_cost(slot, nfe, afs)
        assert replay.evals <= 4 * cost, slot
        if slot[0] == 'sigmas':
            assert replay.evals == 4 * cost, slot


def test_the_default_budget_is_larger_with_coefficients(digits):
    """--refine_budget's default: 6 teacher runs for the refinement, 12 when it also learns
    coefficients (the points alone get about the refinement's share, the joint fit the rest)."""
    lat = torch.randn(12, *digits.shape, generator=torch.Generator().manual_seed(3))
    common = dict(num_steps=3, sigma_min=0.002, sigma_max=80, num_steps_tea=9, solver='unipc', refine=True,
                  student_grid=5)
    assert (student_search.default_refine_budget(False), student_search.default_refine_budget(True)) == (6, 12)
    for coefficients in (False, True):
        _, info = student_search.search_rounds(gits.warmup_split(digits.denoise, lat[:8]),
                                               check_rounds=gits.warmup_split(digits.denoise, lat[8:]),
                                               refine_coefficients=coefficients, **common)
        refined = info['refined']['3']
        assert info['refine_budget'] == student_search.default_refine_budget(coefficients)   # what files record
        assert refined['budget'] == student_search.schedule_budget(
            student_search.default_refine_budget(coefficients), info['evals']['teacher'], info['evals']['check'], 1)
        assert 0 < refined['evals'] <= refined['budget']


def sample_cli(*args):
    return run_here(sample.main, '--dataset_name=digits', *args)


@pytest.fixture(scope='module')
def learned_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('learned') / 'learned.json'
    r = sample_cli('--solver=unipc', '--max_order=2', '--dp=True', '--refine=True', '--refine_coefficients=True',
                   '--num_steps=4', '--save_num_steps=3,4', '--num_warmup=16', '--num_steps_tea=13', '--refine_budget=40',
                   f'--save_schedules={path}')
    assert r.returncode == 0, r.stderr
    assert 'with learned coefficients' in r.stdout or 'analytic coefficients' in r.stdout
    return path


def test_schedule_files_with_coefficients_round_trip_into_run_json(learned_file, tmp_path, digits):
    record = json.loads(learned_file.read_text())
    assert record['refine_coefficients'] is True and set(record['coefficients']) == {'3', '4'}
    assert record['refine_budget'] == 40
    kept = {n: c for n, c in record['coefficients'].items() if c is not None}
    assert kept, 'the search kept no learned coefficients'
    n, table = next(iter(kept.items()))
    out = tmp_path / 'out'
    r = sample_cli('--solver=unipc', '--max_order=2', f'--schedule_file={learned_file}', f'--num_steps={n}',
                   '--seeds=0-1', f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    run = json.loads((out / 'run.json').read_text())
    assert run['coefficients'] == table and run['t_steps'] == record['schedules'][n]
    # The images are those of the learned table, not of the analytic one.
    ts = torch.tensor(record['schedules'][n], dtype=torch.float64)
    noise = torch.stack([torch.randn(*digits.shape, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    learned = solvers.unipc(digits.denoise, noise * ts[0], ts, max_order=2, coefficients=table)
    analytic = solvers.unipc(digits.denoise, noise * ts[0], ts, max_order=2)
    assert not torch.equal(learned, analytic)
    # A folder of the same run with other coefficients is refused (they are part of the identity).
    record['coefficients'][n] = solvers.analytic_coefficients('unipc', ts, max_order=2)
    other = tmp_path / 'other.json'
    other.write_text(json.dumps(record))
    r = sample_cli('--solver=unipc', '--max_order=2', f'--schedule_file={other}', f'--num_steps={n}',
                   '--seeds=0-1', f'--outdir={out}')
    assert_one_line_error(r, 'coefficients')


def test_mismatched_coefficient_files_are_refused_in_one_line(learned_file, tmp_path):
    out = f'--outdir={tmp_path / "out"}'
    r = sample_cli('--solver=unipc', '--max_order=3', f'--schedule_file={learned_file}', '--num_steps=4', '--seeds=0', out)
    assert_one_line_error(r, '--max_order')
    r = sample_cli('--solver=dpmpp', '--max_order=2', f'--schedule_file={learned_file}', '--num_steps=4', '--seeds=0', out)
    assert_one_line_error(r, '--solver')
    record = json.loads(learned_file.read_text())
    table = solvers.analytic_coefficients('unipc', record['schedules']['4'], max_order=2)
    table['predictor'][1].append(0.0)            # an order-3 step under the file's max_order=2
    record['coefficients']['4'] = table
    edited = tmp_path / 'edited.json'
    edited.write_text(json.dumps(record))
    r = sample_cli('--solver=unipc', '--max_order=2', f'--schedule_file={edited}', '--num_steps=4', '--seeds=0',
                   f'--outdir={tmp_path / "out"}')
    assert_one_line_error(r, '--schedule_file')
    assert 'predictor step 1' in r.stderr and not (tmp_path / 'out').exists()
    record['coefficients']['4'] = dict(solvers.analytic_coefficients('unipc', record['schedules']['4'], max_order=2),
                                       sigmas=record['schedules']['4'][:2])      # 3 outputs at 4 points
    edited.write_text(json.dumps(record))
    r = sample_cli('--solver=unipc', '--max_order=2', f'--schedule_file={edited}', '--num_steps=4', '--seeds=0',
                   f'--outdir={tmp_path / "out"}')
    assert_one_line_error(r, '--schedule_file')
    assert 'sigmas must be 3 positive noise levels' in r.stderr and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('args,why', [
    (('--solver=unipc', '--max_order=3', '--compat=gits-main'), 'not in the paper'),
    (('--solver=heun', '--refine=True'), 'only the multistep solvers'),
    (('--solver=euler', '--refine=True'), 'only the multistep solvers'),
])
def test_refine_coefficients_refusals(tmp_path, args, why):
    r = sample_cli(*args, '--dp=True', '--refine_coefficients=True', '--seeds=0', f'--outdir={tmp_path / "out"}')
    assert_one_line_error(r, '--refine_coefficients')
    assert why in r.stderr and not (tmp_path / 'out').exists()
    r = sample_cli('--solver=unipc', '--dp=True', '--refine_coefficients=True', '--seeds=0', f'--outdir={tmp_path / "o"}')
    assert_one_line_error(r, '--refine_coefficients')
    assert 'needs --refine=True' in r.stderr
    r = sample_cli('--solver=unipc', '--refine_coefficients=True', '--seeds=0', f'--outdir={tmp_path / "o"}')
    assert_one_line_error(r, '--refine_coefficients')


def test_run_json_has_no_coefficients_key_without_them(tmp_path):
    out = tmp_path / 'out'
    r = sample_cli('--solver=unipc', '--num_steps=4', '--seeds=0', f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    run = json.loads((out / 'run.json').read_text())
    assert 'coefficients' not in run and 'refine_coefficients' not in run['options']
    assert run_schedule.searched_coefficients(None, 4) is None
