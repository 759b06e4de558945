"""compat='gits-main' in the GITS search and the command lines: the search against an independent
reference of the official search (gits_main_reference.search: teacher options, the afs teacher and
its free-step search, cost matrix, DP), the teacher-option rules of our default, honest evaluation
counts, and sample.py --compat end to end and its refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import gits
import models
import sample
import schedules
import solvers
from reference import gits_main_reference as official
from helpers import assert_one_line_error, listing, run_here, write_release
from torch_utils.seeds import seed_batch

COMPAT = 'gits-main'
TEA_POINTS = 13


@pytest.fixture(scope='module')
def warm(digits):
    g = torch.Generator().manual_seed(0)
    return torch.randn([6, *digits.shape], generator=g, dtype=torch.float64)


@pytest.fixture(scope='module')
def t_tea():
    return schedules.get_schedule(TEA_POINTS, 0.002, 80, 'polynomial', 7.0, compat=COMPAT)


class CountingRows:
    """A denoiser that counts the batch rows it evaluates."""

    def __init__(self, denoise):
        self.denoise, self.rows = denoise, 0

    def __call__(self, x, sigma, **kw):
        self.rows += x.shape[0]
        return self.denoise(x, sigma, **kw)


def our_search(digits, warm, num_steps, solver, solver_tea, flags, afs, metric, coeff):
    counter = CountingRows(digits.denoise)
    schedules, info = gits.search_rounds([(0, counter, warm)], num_steps=num_steps, sigma_min=0.002, sigma_max=80,
                                         num_steps_tea=TEA_POINTS, solver=solver, solver_tea=solver_tea, afs=afs,
                                         metric=metric, coeff=coeff, compat=COMPAT, **flags)
    assert counter.rows == info['evals']['teacher'] + info['evals']['afs']      # every evaluation is counted
    return schedules[num_steps], info


# (student, teacher, flags, afs, metric, coeff, what the case shows). With coeff 3 the official's
# afs teacher leaves room for the free step on this warm-up set (asserted below), so the free-step
# search runs or fails as the official's does.
CASES = [
    ('dpmpp', 'dpmpp', dict(max_order=2, predict_x0=False, lower_order_final=True), False, 'dev', 1.15, 'SD recipe'),
    ('ipndm', 'ipndm', dict(max_order=3), False, 'l2', 1.15, 'max_order'),
    ('heun', 'ipndm', dict(max_order=2), False, 'dev', 1.15, 'flag only the teacher takes'),
    ('unipc', 'dpmpp', dict(max_order=3, lower_order_final=False), False, 'l1', 1.15, 'thresholding teacher'),
    ('euler', 'ipndm', dict(max_order=4), True, 'dev', 1.15, 'afs, no room'),
    ('euler', 'ipndm', dict(max_order=4), True, 'dev', 3.0, 'afs, free step'),
    ('dpmpp', 'dpmpp', dict(max_order=2, lower_order_final=False), True, 'dev', 3.0, 'afs, free step'),
    ('ipndm_v', 'heun', dict(max_order=4), True, 'dev', 3.0, 'afs, free step'),
    ('deis', 'deis', dict(max_order=3), True, 'dev', 3.0, 'afs, teacher-grid DEIS coefficients'),
    ('dpmpp', 'ipndm', dict(max_order=2), True, 'dev', 3.0, 'afs, official fails (order 0)'),
    ('deis', 'ipndm', dict(max_order=3), True, 'dev', 3.0, 'afs, official fails (no coefficients)'),
    ('unipc', 'ipndm', dict(max_order=2), True, 'dev', 3.0, 'afs, official fails (no UniPC)'),
]


@pytest.mark.parametrize('solver, solver_tea, flags, afs, metric, coeff, what', CASES, ids=[c[-1] for c in CASES])
def test_search_matches_official_reference(digits, warm, t_tea, solver, solver_tea, flags, afs, metric, coeff, what):
    """The searched indices equal the official formulas' (teacher with the student's flags and
    afs, float64 costs, the official DP and free-step search); where the official fails, one
    ValueError line naming the flag."""
    num_steps = 4
    try:
        expected = official.search(digits.denoise, warm, t_tea, num_steps, solver, solver_tea, flags, afs, metric, coeff)
    except official.OfficialCrash:
        with pytest.raises(ValueError) as e:
            our_search(digits, warm, num_steps, solver, solver_tea, flags, afs, metric, coeff)
        text = str(e.value)
        assert '\n' not in text and text.startswith(('--afs:', '--lower_order_final:')) and COMPAT in text, text
        return
    t_steps, info = our_search(digits, warm, num_steps, solver, solver_tea, flags, afs, metric, coeff)
    assert info['indices'][str(num_steps)] == expected
    assert torch.equal(t_steps, t_tea[expected])
    if afs:      # the afs teacher: its step 0 -> 1 is free for the DP, which then starts [0, 1, ...]
        assert info['teacher_afs'] is True
        assert (expected[1] == 1) == (coeff == 1.15), expected
        assert len(expected) == num_steps + (expected[1] != 1)
        assert (info['evals']['afs'] > 0) == (expected[1] != 1)


def test_free_step_cases_have_room(digits, warm, t_tea):
    """The official's free-step search really runs in the afs cases above (the DP leaves room), so
    the failures and the DEIS coefficients are exercised."""
    ts = [float(t) for t in t_tea]
    traj = official.sample('ipndm', digits.denoise, warm * ts[0], ts, afs=True, max_order=4)
    slopes = [official._afs_slope(traj[0], ts[0])] + [(traj[i] - digits.denoise(traj[i], ts[i])) / ts[i]
                                                      for i in range(1, len(ts) - 1)]
    path = official.dp(official.cost_matrix(traj, slopes, ts, 'dev'), 4, 3.0)
    assert path[1] > 1, path


@pytest.mark.parametrize('solver, solver_tea, flags, afs', [
    ('dpmpp', 'dpmpp', dict(max_order=2, predict_x0=False, lower_order_final=True), False),
    ('ipndm', 'ipndm', dict(max_order=3), False),
    ('ipndm', 'dpmpp', dict(max_order=2), True),
])
def test_teacher_runs_with_the_student_flags(digits, warm, t_tea, solver, solver_tea, flags, afs):
    """The teacher trajectory is the official teacher's with the student's flags (1e-10), and
    differs from a teacher with its own defaults (so the inheritance is what is tested)."""
    _, teacher = gits.search_options(solver, solver_tea, flags, COMPAT, TEA_POINTS)
    xs, ds, _, rec = gits.teacher_run(digits.denoise, warm, t_tea, solver_tea, afs, COMPAT, **teacher)
    ts = [float(t) for t in t_tea]
    theirs = official.sample(solver_tea, digits.denoise, warm * ts[0], ts, afs=afs, **official._flags(solver_tea, flags))
    for ours_x, their_x in zip(xs, theirs):
        torch.testing.assert_close(ours_x, their_x, rtol=1e-10, atol=1e-10)
    defaults = solvers.resolve_options(solver_tea, {}, COMPAT)
    other = gits.teacher_run(digits.denoise, warm, t_tea, solver_tea, afs, COMPAT, **defaults)[0]
    assert float((other[-2] - xs[-2]).abs().max()) > 1e-4
    if afs:      # the first slope is the analytical one, and cost no evaluation
        torch.testing.assert_close(ds[0], warm * ts[0] / (1 + ts[0] ** 2) ** 0.5, rtol=1e-12, atol=0)
        assert rec.evals == (TEA_POINTS - 2) * warm.shape[0]


def test_cost_matrix_and_dp_match_official_formulas(digits, warm, t_tea):
    """Our cost matrix equals the official formulas' in float64 to round-off (not bit for bit:
    the official measures chord distances from the end point, we from the start; the official
    computes in float32, see docs/official-differences.md), and our DP picks the official DP's path, ties included."""
    xs, ds, _, _ = gits.teacher_run(digits.denoise, warm, t_tea, 'ipndm', True, COMPAT, max_order=4)
    ts = [float(t) for t in t_tea]
    for metric in gits.METRICS:
        ours = gits.trajectory_costs(xs, ds, t_tea, metric).mean(0)
        theirs = official.cost_matrix(list(xs), list(ds), ts, metric)
        upper = torch.ones(TEA_POINTS, TEA_POINTS, dtype=torch.bool).triu(1)
        scale = float(ours[upper].abs().max())
        assert float((ours[upper] - torch.from_numpy(theirs)[upper]).abs().max()) <= 1e-12 * scale, metric
        for n in range(2, TEA_POINTS + 1):
            assert gits.dp(ours, n, 1.15) == official.dp(ours.triu(1).numpy(), n, 1.15), (metric, n)
    g = torch.Generator().manual_seed(4)
    for trial in range(20):
        n = 6 + trial % 5
        cost = torch.randint(-3, 4, (n, n), generator=g).double()       # small integers: many ties
        for coeff in (1.0, 1.15, 2.0):
            for k in range(2, n + 1):
                assert gits.dp(cost, k, coeff) == official.dp(cost.triu(1).numpy(), k, coeff), (trial, coeff, k)


# ----------------------------------------------------------------------------------------------
# The teacher's options by default (and with compat).

@pytest.mark.parametrize('solver, solver_tea, flags, student, teacher', [
    ('dpmpp', 'ipndm', {}, None, dict(max_order=3)),                   # the student's default order
    ('ipndm', 'ipndm', dict(max_order=3), dict(max_order=3), dict(max_order=3)),
    ('ipndm', 'dpmpp', {}, dict(max_order=4),                          # capped to the teacher's range
     dict(max_order=3, predict_x0=True, lower_order_final=True, thresholding=False)),
    ('heun', 'ipndm', dict(max_order=2), {}, dict(max_order=2)),        # a flag only the teacher takes
    ('euler', 'ipndm', {}, {}, dict(max_order=4)),
    ('dpmpp', 'unipc', dict(max_order=2, predict_x0=False), None,
     dict(max_order=2, predict_x0=False, lower_order_final=True, variant='bh2', thresholding=False)),
    ('deis', 'deis', dict(deis_mode='rhoab', max_order=4), None, dict(max_order=4, deis_mode='rhoab')),
])
def test_default_teacher_options(solver, solver_tea, flags, student, teacher):
    got_student, got_teacher = gits.search_options(solver, solver_tea, dict(flags, variant=None))
    assert got_teacher == teacher
    assert got_student == (student if student is not None else solvers.resolve_options(solver, flags))


@pytest.mark.parametrize('solver, solver_tea, flags, compat, flag', [
    ('heun', 'heun', dict(max_order=2), None, '--max_order'),           # neither takes it
    ('heun', 'ipndm', {}, COMPAT, '--max_order'),                       # the official has no default
    ('dpmpp', 'euler', {}, COMPAT, '--max_order'),
    ('ipndm', 'dpmpp', dict(max_order=4), COMPAT, '--max_order'),       # the official teacher asserts <= 3
    ('dpmpp', 'unipc', dict(max_order=2), COMPAT, '--solver_tea'),      # no UniPC teacher in the official
    ('ipndm', 'deis', dict(max_order=3, deis_mode='rhoab'), COMPAT, '--deis_mode'),   # crashes on 13 points
])
def test_search_options_refused(solver, solver_tea, flags, compat, flag):
    with pytest.raises(ValueError) as e:
        gits.search_options(solver, solver_tea, flags, compat, TEA_POINTS)
    assert str(e.value).startswith(flag + ':') and '\n' not in str(e.value), str(e.value)


def test_compat_teacher_options_are_the_flags():
    student, teacher = gits.search_options('dpmpp', 'dpmpp', dict(max_order=2), COMPAT, TEA_POINTS)
    assert teacher == student == dict(max_order=2, predict_x0=True, lower_order_final=True, thresholding=True)
    assert gits.search_options('heun', 'ipndm', dict(max_order=3), COMPAT)[1] == dict(max_order=3)


def test_compat_refuses_denoise_to_zero_and_student_search(digits, warm):
    kw = dict(num_steps=4, sigma_min=0.002, sigma_max=80, num_steps_tea=TEA_POINTS, max_order=4, compat=COMPAT)
    import student_search
    for call, flag in ((lambda: gits.search_rounds([(0, digits.denoise, warm)], denoise_to_zero=True, **kw),
                        '--denoise_to_zero'),
                       (lambda: student_search.search_rounds([(0, digits.denoise, warm)], search='student', **kw),
                        '--search'),
                       (lambda: student_search.search_rounds([(0, digits.denoise, warm)], refine=True, **kw),
                        '--refine')):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(flag + ':') and '\n' not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Evaluations: every denoiser call of a run is in run.json (search) or its NFE (sampling).

@pytest.fixture
def counted_load(monkeypatch):
    """models.load for sample.py, with the model's denoiser counting the batch rows it evaluates."""
    real = models.load
    counters = []

    def load(*args, **kw):
        model = real(*args, **kw)
        counter = CountingRows(model.denoise)
        model.denoise = counter
        counters.append(counter)
        return model
    monkeypatch.setattr(sample.models, 'load', load)
    return counters


UNIPC_TEACHER = dict(max_order=2, predict_x0=True, lower_order_final=True, variant='bh2', thresholding=False)


@pytest.mark.parametrize('args, teacher, points', [
    (['--solver=euler', '--afs=True', '--solver_tea=unipc', '--max_order=2'], UNIPC_TEACHER, 5),   # UniPC teacher
    (['--solver=ipndm', '--afs=True', '--max_order=3'], dict(max_order=3), 5),          # our free-step search
    (['--compat=gits-main', '--solver=euler', '--afs=True', '--max_order=4', '--coeff=3'], dict(max_order=4), 5),
    (['--compat=gits-main', '--solver=ipndm', '--afs=True', '--max_order=4'], dict(max_order=4), 4),   # no room
])
def test_run_json_counts_every_evaluation(tmp_path, counted_load, args, teacher, points):
    """Every call the model receives is in run.json: the search's evaluations (teacher, free-step
    search) plus the sampling NFE for each seed; run.json also holds the teacher's options."""
    out = tmp_path / 'o'
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-4', '--batch=3', '--dp=True', '--num_warmup=6',
                 f'--num_steps_tea={TEA_POINTS}', '--num_steps=4', *args, f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads((out / 'run.json').read_text())
    evals = record['search']['evals']
    assert record['search']['teacher_options'] == teacher
    assert len(record['t_steps']) == points and record['nfe'] == points - 2       # afs: the first step is free
    assert (evals['afs'] > 0) == (points == 5)
    if '--solver_tea=unipc' in args:
        assert evals['teacher'] > (TEA_POINTS - 1) * 6      # its corrector moved points: they were evaluated
    assert counted_load[0].rows == sum(evals.values()) + record['nfe'] * 5
    assert f'{evals["teacher"]} teacher, {evals["afs"]} afs free step' in r.stdout


# ----------------------------------------------------------------------------------------------
# sample.py --compat end to end.

def test_sample_compat_end_to_end(tmp_path, digits):
    """run.json records compat (an identity setting: a default run into the folder is refused),
    the images are the compat solver's on the official float32 schedule, and the schedule file of
    a compat search records compat and refuses a run without it."""
    out = tmp_path / 'o'
    args = ['--dataset_name=digits', '--seeds=0-3', '--solver=dpmpp', '--max_order=3', '--num_steps=6']
    r = run_here(sample.main, *args, '--compat=gits-main', f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads((out / 'run.json').read_text())
    assert record['compat'] == COMPAT and record['solver_options']['thresholding'] is True
    ts = schedules.get_schedule(6, 0.002, 80, compat=COMPAT)
    assert record['t_steps'] == ts.tolist() and record['nfe'] == 5
    noise, denoise = seed_batch(digits, [0, 1, 2, 3], 'cpu')
    x = solvers.dpmpp(denoise, noise * float(ts[0]), ts, compat=COMPAT, max_order=3)
    default = solvers.dpmpp(denoise, noise * float(ts[0]), ts, max_order=3)
    assert float((x - default).abs().max()) > 1e-3            # the official's 3M update shows
    for seed, image in enumerate(sample.to_uint8(digits.decode(x))):
        assert np.array_equal(np.asarray(Image.open(out / f'{seed:06d}.png')), image[:, :, 0])
    r = run_here(sample.main, *args, f'--outdir={out}')
    assert_one_line_error(r, '--compat (gits-main -> None)')
    # Schedule files.
    path = tmp_path / 's.json'
    r = run_here(sample.main, '--dataset_name=digits', '--compat=gits-main', '--max_order=4', '--dp=True', '--afs=True',
                 '--num_warmup=4', f'--num_steps_tea={TEA_POINTS}', f'--save_schedules={path}', '--save_num_steps=4-5')
    assert r.returncode == 0, r.stderr
    saved = json.loads(path.read_text())
    assert saved['compat'] == COMPAT and saved['teacher_options'] == dict(max_order=4)
    before = listing(tmp_path)
    r = run_here(sample.main, '--dataset_name=digits', '--max_order=4', '--afs=True', '--num_steps=5',
                 f'--schedule_file={path}', f'--outdir={tmp_path / "x"}')
    assert_one_line_error(r, '--compat')
    assert listing(tmp_path) == before
    r = run_here(sample.main, '--dataset_name=digits', '--compat=gits-main', '--max_order=4', '--afs=True',
                 '--num_steps=5', f'--schedule_file={path}', f'--outdir={tmp_path / "y"}')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / 'y' / 'run.json').read_text())['t_steps'] == saved['schedules']['5']


def test_compat_t_steps_read_as_float32(tmp_path):
    out = tmp_path / 'o'
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0', '--solver=euler', '--compat=gits-main',
                 '--t_steps=[80,10.9836,3.8811,1.584,0.5666,0.1698,0.002]', f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    t = json.loads((out / 'run.json').read_text())['t_steps']
    assert t == torch.tensor([80, 10.9836, 3.8811, 1.584, 0.5666, 0.1698, 0.002], dtype=torch.float32).tolist()
    assert t[1] != 10.9836


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, nothing written.

BAD = [
    (['--compat=foo'], '--compat'),
    (['--solver=ipndm', '--thresholding=True'], '--thresholding'),
    (['--solver=dpmpp', '--predict_x0=False', '--thresholding=True'], '--thresholding'),
    (['--solver=dpmpp', '--thresholding=False', '--compat=gits-main', '--max_order=3'], '--thresholding'),
    (['--compat=gits-main', '--solver=ipndm'], '--max_order'),
    (['--compat=gits-main', '--max_order=4', '--dp=True', '--search=student'], '--search'),
    (['--compat=gits-main', '--max_order=4', '--dp=True', '--refine=True'], '--refine'),
    (['--compat=gits-main', '--max_order=4', '--sigma_max=50'], '--sigma_max'),
    (['--compat=gits-main', '--max_order=4', '--dp=True', '--denoise_to_zero=True', '--num_warmup=4',
      f'--num_steps_tea={TEA_POINTS}'], '--denoise_to_zero'),
    (['--compat=gits-main', '--solver=deis', '--deis_mode=rhoab', '--max_order=3', '--num_steps=6'], '--deis_mode'),
    (['--solver=heun', '--max_order=3'], '--max_order'),
]


@pytest.mark.parametrize('args, flag', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_input(tmp_path, args, flag):
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', *args, f'--outdir={tmp_path / "o"}', cwd=tmp_path)
    assert_one_line_error(r, flag)
    assert listing(tmp_path) == []


@pytest.fixture(scope='module')
def tiny_ldm(tmp_path_factory):
    from helpers import load_golden
    from test_ldm import tiny_ldm_config, tiny_ldm_state_dict
    golden = load_golden('ldm_unet_vq')
    folder = tmp_path_factory.mktemp('tiny_ldm')
    write_release(folder, tiny_ldm_state_dict(golden), tiny_ldm_config(golden))
    return folder


def test_thresholding_refused_on_latent_models(tiny_ldm, tmp_path):
    """Latents are not data in [-1, 1]: --thresholding is refused there; --compat thresholds them
    anyway, as the official does (run.json says so)."""
    common = ['--dataset_name=lsun_bedroom_ldm', f'--model_path={tiny_ldm}', '--guidance_type=uncond', '--seeds=0-1',
              '--solver=dpmpp', '--num_steps=4', '--schedule_type=discrete', '--schedule_rho=1']
    r = run_here(sample.main, *common, '--thresholding=True', f'--outdir={tmp_path / "o"}', cwd=tmp_path)
    assert_one_line_error(r, '--thresholding')
    assert 'latent' in r.stderr and listing(tmp_path) == []
    r = run_here(sample.main, *common, '--compat=gits-main', '--max_order=2', f'--outdir={tmp_path / "c"}')
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / 'c' / 'run.json').read_text())
    assert record['compat'] == COMPAT and record['solver_options']['thresholding'] is True
    assert models.load('lsun_bedroom_ldm', model_path=str(tiny_ldm), guidance_type='uncond').latent_space
    assert not models.load('digits').latent_space


@pytest.mark.parametrize('deis_mode, max_order', [('tab', 3), ('tab', 4), ('rhoab', 4)])
def test_official_deis_free_step_trial(digits, warm, t_tea, deis_mode, max_order):
    """The official runs a DEIS free-step candidate with the coefficient rows of the teacher grid
    (its coefficient list is the teacher's): ours equals the reference's to 1e-9 and differs from
    DEIS on the candidate's own coefficients."""
    options = dict(max_order=max_order, deis_mode=deis_mode)
    trial = t_tea[[0, 3, 8, 9, 12]]
    ours = gits._trial_runner('deis', options, COMPAT, t_tea)(digits.denoise, warm * float(trial[0]), trial)
    theirs = official._trial(digits.denoise, warm * float(trial[0]), trial.tolist(), 'deis', options, 4, 'deis',
                             t_tea.tolist())
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    own = solvers.deis(digits.denoise, warm * float(trial[0]), trial, afs=True, compat=COMPAT, **options)
    assert float((own - ours).abs().max()) > 1e-3
