"""GITS: the DP against brute force, the cost matrix against a direct computation, determinism
(bit for bit, across batch sizes and processes), schedule files, afs, and flag errors."""

import itertools
import json
import math
import threading

import pytest
import torch

import gits
import schedules
import solvers
from helpers import assert_one_line_error, listing, run_cli, run_here, sample_one_and_two_processes


def brute_force(cost, num_points, coeff):
    n = len(cost)
    best, best_path = math.inf, None
    for inner in itertools.combinations(range(1, n - 1), num_points - 2):
        path = [0, *inner, n - 1]
        value = gits.path_cost(cost, path, coeff)
        if value < best - 1e-12:
            best, best_path = value, path
    return best, best_path


@pytest.mark.parametrize('n', [5, 8, 12])
@pytest.mark.parametrize('coeff', [0.8, 1.0, 1.15, 1.5])
def test_dp_matches_brute_force(n, coeff):
    g = torch.Generator().manual_seed(n * 100 + int(coeff * 100))
    cost = torch.rand([n, n], generator=g, dtype=torch.float64) * 2 - 0.5     # signed, like 'dev'
    paths = gits.dp_all(cost, coeff)
    assert sorted(paths) == list(range(1, n))
    for k, path in paths.items():
        best, _ = brute_force(cost, k + 1, coeff)
        assert path[0] == 0 and path[-1] == n - 1 and len(path) == k + 1
        assert all(a < b for a, b in zip(path, path[1:]))
        assert gits.path_cost(cost, path, coeff) == pytest.approx(best, abs=1e-12)
        assert gits.dp(cost, k + 1, coeff) == path


def direct_costs(xs, ds, t_tea, metric):
    """The reference: every cost C[b, i, j] from its definition, one Euler step at a time."""
    n, b = xs.shape[:2]
    points, slopes = xs.reshape(n, b, -1).double(), ds.reshape(n - 1, b, -1).double()
    start, chord = points[0], points[-1] - points[0]
    unit = chord / chord.norm(dim=-1, keepdim=True)

    def line_distance(p):
        rel = p - start
        return (rel - (rel * unit).sum(-1, keepdim=True) * unit).norm(dim=-1)

    cost = torch.full([b, n, n], math.inf, dtype=torch.float64)
    for i in range(n - 1):
        for j in range(i + 1, n):
            xhat = points[i] + (float(t_tea[j]) - float(t_tea[i])) * slopes[i]
            if metric == 'dev':      # the last point lies on the line: its own distance is 0
                cost[:, i, j] = line_distance(xhat) - (0 if j == n - 1 else line_distance(points[j]))
            else:
                cost[:, i, j] = (xhat - points[j]).norm(p=1 if metric == 'l1' else 2, dim=-1)
    return cost


@pytest.mark.parametrize('name,num', [('gmm', 3), ('digits', 8)])
def test_cost_matrix_matches_direct_computation(request, name, num):
    """The O(N B D) dev cost and the blocked l1/l2 costs equal the definition to 1e-9 (atol 1e-12
    for the entries where the definition's own difference of distances cancels), on the teacher
    trajectories of sample.py's defaults (float32 warm-up noise, iPNDM over 61 points), pick the
    same DP path for every number of steps, and do not depend on the batch."""
    model = request.getfixturevalue(name)
    lat = torch.randn(num, *model.shape, generator=torch.Generator().manual_seed(0))
    t_tea = schedules.get_schedule(61, 0.002, 80)
    xs, ds, _ = gits.teacher_trajectory(model.denoise, lat, t_tea, 'ipndm')
    # Slopes taken from the teacher's own calls equal fresh evaluations.
    for i in (0, 30, 59):
        assert torch.equal(ds[i], (xs[i] - model.denoise(xs[i], float(t_tea[i]))) / float(t_tea[i]))
    upper = torch.ones(61, 61, dtype=torch.bool).triu(1)
    for metric in gits.METRICS:
        fast = gits.trajectory_costs(xs, ds, t_tea, metric)
        ref = direct_costs(xs, ds, t_tea, metric)
        assert fast.dtype == torch.float64 and torch.isinf(fast[:, ~upper]).all()
        torch.testing.assert_close(fast[:, upper], ref[:, upper], rtol=1e-9, atol=1e-12)
        assert gits.dp_all(fast.mean(0), 1.15) == gits.dp_all(ref.mean(0), 1.15)
        alone = gits.trajectory_costs(xs[:, 1:2], ds[:, 1:2], t_tea, metric)
        assert torch.equal(alone[0], fast[1])


@pytest.mark.parametrize('name,num', [('gmm', 3), ('digits', 8)])
def test_cost_matrix_does_not_depend_on_the_thread_count(request, name, num):
    """torchrun's processes run one thread each and a lone process runs several: every metric's
    costs are the same bits either way (the dev cost's block is fixed for that reason)."""
    model = request.getfixturevalue(name)
    lat = torch.randn(num, *model.shape, generator=torch.Generator().manual_seed(1))
    t_tea = schedules.get_schedule(34, 0.002, 80)           # 33 rows: 32 of 3x32x32 and a partial block
    xs, ds, _ = gits.teacher_trajectory(model.denoise, lat, t_tea, 'ipndm')
    threads = torch.get_num_threads()
    try:
        costs = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            costs[count] = [gits.trajectory_costs(xs, ds, t_tea, metric) for metric in gits.METRICS]
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(costs[1], costs[2]):
        assert torch.equal(one, two)
    assert torch.isfinite(costs[1][0][:, 0, 1:]).all()


def test_cost_matrices_are_computed_beside_the_next_teacher(digits, monkeypatch):
    """With overlap, round 0's matrices run on the helper thread while round 1's teacher runs (its
    first call waits until they have started: without overlap it would wait in vain), and the
    search finds the same matrices and schedule as without."""
    lat = torch.randn(6, *digits.shape, generator=torch.Generator().manual_seed(3))
    t_tea = schedules.get_schedule(15, 0.002, 80)
    started, seen = threading.Event(), []
    original = gits._timed_costs

    def timed_costs(xs, ds, t, metric):
        started.set()
        return original(xs, ds, t, metric)

    def second_round(x, sigma):
        if not seen:
            seen.append(started.wait(timeout=20))
        return digits.denoise(x, sigma)

    monkeypatch.setattr(gits, '_timed_costs', timed_costs)
    rounds = [(0, digits.denoise, lat[:3]), (3, second_round, lat[3:])]
    data, _, _ = gits.run_teachers(rounds, t_tea, 'ipndm', metric='dev', overlap=True)
    assert seen == [True]
    timing = {}
    paths = gits.gits_paths(data, t_tea, [4, 6], 'dev', timing=timing)
    assert timing['cost_helper'] > 0 and not any(r.pending for r in data)
    alone, _, _ = gits.run_teachers(rounds, t_tea, 'ipndm', metric='dev', overlap=False)
    assert not any(r.pending for r in alone)
    again, _, _ = gits.run_teachers(rounds, t_tea, 'ipndm', metric='dev', overlap=True)
    for mine, theirs in zip(again, alone):
        assert torch.equal(mine.xs, theirs.xs)
        costs, seconds = mine.costs(t_tea, 'dev')                # the helper's own matrices
        assert seconds > 0 and torch.equal(costs, gits.trajectory_costs(theirs.xs, theirs.ds, t_tea, 'dev'))
    assert gits.gits_paths(alone, t_tea, [4, 6], 'dev') == paths


def test_cost_matrices_overlap_only_beside_an_idle_core(monkeypatch):
    monkeypatch.setattr(gits.os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    for threads, spare in ((1, True), (3, True), (4, False), (5, False)):
        monkeypatch.setattr(gits.torch, 'get_num_threads', lambda: threads)
        assert gits.spare_core('cpu') is spare
    monkeypatch.setattr(gits.torch, 'get_num_threads', lambda: 1)
    assert gits.spare_core('meta') is False
    for processes, spare in ((2, True), (4, False)):      # torchrun's processes on this machine, one thread each
        monkeypatch.setenv('LOCAL_WORLD_SIZE', str(processes))
        assert gits.spare_core('cpu') is spare


def test_search_is_deterministic_and_batch_invariant(digits):
    lat = torch.randn(12, *digits.shape, generator=torch.Generator().manual_seed(7))
    kw = dict(num_steps=5, sigma_min=0.002, sigma_max=80, solver_tea='heun', num_steps_tea=21)
    a = gits.search_schedule(digits.denoise, lat, **kw)
    b = gits.search_schedule(digits.denoise, lat, batch_size=5, **kw)
    c = gits.search_schedule(digits.denoise, lat, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert len(a) == 5 and a[0] == 80 and a[-1] == pytest.approx(0.002)
    grid = schedules.get_schedule(21, 0.002, 80)
    assert all(any(float(t) == float(g) for g in grid) for t in a)    # points of the teacher grid


def test_one_teacher_serves_every_num_steps(digits):
    lat = torch.randn(6, *digits.shape, generator=torch.Generator().manual_seed(8))
    rounds = [(0, digits.denoise, lat)]
    kw = dict(sigma_min=0.002, sigma_max=80, solver_tea='euler', num_steps_tea=15)
    many, info = gits.search_rounds(rounds, num_steps=4, all_num_steps=[3, 4, 6], **kw)
    assert info['teacher_evals_this_rank'] == 14      # one Euler teacher run over 15 points
    for n in (3, 4, 6):
        single, _ = gits.search_rounds(rounds, num_steps=n, **kw)
        assert torch.equal(many[n], single[n])


def test_afs_free_step_is_the_best_candidate(digits):
    lat = torch.randn(8, *digits.shape, generator=torch.Generator().manual_seed(9))
    kw = dict(sigma_min=0.002, sigma_max=80, solver_tea='heun', num_steps_tea=25, num_steps=4)
    plain, info = gits.search_rounds([(0, digits.denoise, lat)], **kw)
    with_afs, info_afs = gits.search_rounds([(0, digits.denoise, lat)], afs=True, solver='euler', **kw)
    path, path_afs = info['indices']['4'], info_afs['indices']['4']
    t_tea = torch.tensor(info['teacher_grid'], dtype=torch.float64)
    assert path[1] - path[0] > 1       # this warm-up set leaves candidates for the free step
    assert len(path_afs) == 5 and path_afs[0] == path[0] and path_afs[2:] == path[1:]
    # Recompute every candidate's error against the teacher's final points.
    xs, _, _ = gits.teacher_trajectory(digits.denoise, lat, t_tea, 'heun')
    errs = {}
    for m in range(path[0] + 1, path[1]):
        trial = t_tea[[path[0], m] + path[1:]]
        out = solvers.euler(digits.denoise, lat * 80, trial, afs=True)
        errs[m] = float((out - xs[-1]).reshape(8, -1).to(torch.float64).norm(dim=1).mean())
    assert path_afs[1] == min(errs, key=errs.get)


@pytest.mark.parametrize('target', [1, 2, 4])
def test_afs_free_step_tries_exactly_the_candidates_between_the_first_two_points(digits, target):
    """Every teacher point strictly between path[0] and path[1] is tried once per trajectory, and
    nothing else; the evaluations are those runs' own; the one whose student output is the
    teacher's final point (error 0: here the target is made from that candidate's own run) is
    kept, whether it lies at either end of the candidates (1 and 4) or inside (2)."""
    lat = torch.randn(5, *digits.shape, generator=torch.Generator().manual_seed(10))
    t_tea = schedules.get_schedule(13, 0.002, 80)
    path = [0, 5, 9, 12]
    options = solvers.resolve_options('ipndm', {})
    calls = []

    def denoise(x, sigma):
        calls.append((float(sigma), x.shape[0]))
        return digits.denoise(x, sigma)

    def student(x, points):
        return solvers.ipndm(digits.denoise, x * float(t_tea[0]), t_tea[points], afs=True, **options)

    data = []
    for first, size in ((0, 3), (3, 2)):                    # two rounds, as from two batches
        x = lat[first:first + size]
        final = student(x, [0, target] + path[1:])          # the teacher's final point: that candidate's output
        data.append(gits.TeacherRound(first, denoise, x, final[None], None, None))
    t_steps, new_path, evals = gits.afs_free_step(data, t_tea, path, 'ipndm', options)
    assert new_path == [0, target, 5, 9, 12] and torch.equal(t_steps, t_tea[new_path])
    # Exactly the candidates 1..4 were tried, each on all 5 trajectories; a 5-point afs run of
    # iPNDM evaluates at its points 1..3 (never at t_0).
    tried = sorted({s for s, _ in calls} - {float(t_tea[k]) for k in path})
    assert tried == [float(t_tea[m]) for m in (4, 3, 2, 1)]
    rows = {}
    for s, b in calls:
        rows[s] = rows.get(s, 0) + b
    assert all(rows[float(t_tea[m])] == 5 for m in (1, 2, 3, 4))
    assert rows[float(t_tea[5])] == rows[float(t_tea[9])] == 4 * 5 and float(t_tea[0]) not in rows
    assert evals == sum(rows.values()) == 4 * 5 * solvers.count_nfe('ipndm', 5, afs=True)
    # Without room between the first two points nothing is tried.
    calls.clear()
    t_same, same_path, none = gits.afs_free_step(data, t_tea, [0, 1, 9, 12], 'ipndm', options)
    assert same_path == [0, 1, 9, 12] and none == 0 and not calls and torch.equal(t_same, t_tea[[0, 1, 9, 12]])


def test_torchrun_two_processes_same_schedule(tmp_path):
    args = ['--dataset_name=digits', '--seeds=0-3', '--dp=True', '--num_warmup=10', '--batch=4',
            '--solver=heun', '--solver_tea=heun', '--num_steps=5', '--num_steps_tea=21']
    one, two, stdout = sample_one_and_two_processes(tmp_path, *args)
    assert one['t_steps'] == two['t_steps']
    assert one['search']['num_warmup'] == two['search']['num_warmup'] == 10
    # The searched schedule, pasted back, reproduces the images.
    r3 = run_cli('sample.py', '--dataset_name=digits', '--seeds=0-3', '--solver=heun',
                 f'--t_steps={one["t_steps_text"]}', f'--outdir={tmp_path / "pasted"}')
    assert r3.returncode == 0, r3.stderr
    for s in range(4):
        name = f'{s:06d}.png'
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'pasted' / name).read_bytes()
    assert f'--t_steps={one["t_steps_text"]}' in stdout


def test_save_schedules_then_sample_from_file(tmp_path):
    path = tmp_path / 'sched.json'
    common = ['--dataset_name=digits', '--num_warmup=6', '--solver=heun', '--solver_tea=heun', '--num_steps_tea=21']
    r = run_cli('sample.py', *common, '--dp=True', f'--save_schedules={path}', '--save_num_steps=3-6')
    assert r.returncode == 0, r.stderr
    saved = json.loads(path.read_text())
    assert sorted(saved['schedules'], key=int) == ['3', '4', '5', '6']
    for n in (3, 5):
        out = tmp_path / f'n{n}'
        r = run_cli('sample.py', '--dataset_name=digits', '--seeds=0-1', '--solver=heun', f'--num_steps={n}',
                    f'--schedule_file={path}', f'--outdir={out}')
        assert r.returncode == 0, r.stderr
        assert json.loads((out / 'run.json').read_text())['t_steps'] == saved['schedules'][str(n)]
    r = run_cli('sample.py', '--dataset_name=digits', '--solver=heun', '--num_steps=9', f'--schedule_file={path}',
                f'--outdir={tmp_path / "x"}')
    assert_one_line_error(r, '--num_steps')
    for args, flag in (([f'--schedule_file={tmp_path / "missing.json"}'], '--schedule_file'),
                       ([f'--schedule_file={path}', '--t_steps=[80,1,0.002]'], '--schedule_file')):
        r = run_cli('sample.py', '--dataset_name=digits', '--solver=heun', *args, f'--outdir={tmp_path / "y"}')
        assert_one_line_error(r, flag)
        assert not (tmp_path / 'y').exists()


def test_schedule_file_records_its_run_and_refuses_another(tmp_path):
    """A schedule file records what it was searched for and how; sampling from it refuses a
    different model, solver, solver option or afs, and any named schedule or search flag that
    differs from the file. The file's folder is created; bad files fail in one line."""
    import sample
    path = tmp_path / 'new' / 'sub' / 'sched.json'
    search = ['--dataset_name=digits', '--solver=ipndm', '--num_warmup=4', '--num_steps_tea=13']
    r = run_here(sample.main, *search, '--dp=True', f'--save_schedules={path}', '--save_num_steps=4-6')
    assert r.returncode == 0, r.stderr
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in ('dataset_name', 'solver', 'afs', 'schedule_type', 'schedule_rho', 'coeff', 'num_warmup')} == \
        dict(dataset_name='digits', solver='ipndm', afs=False, schedule_type='polynomial', schedule_rho=7.0, coeff=1.15,
             num_warmup=4)
    assert saved['solver_options'] == {'max_order': 4} and (saved['sigma_min'], saved['sigma_max']) == (0.002, 80.0)
    use = ['--seeds=0-1', '--num_steps=5', f'--schedule_file={path}']
    r = run_here(sample.main, '--dataset_name=digits', *use, f'--outdir={tmp_path / "ok"}', '--schedule_type=polynomial',
                 '--schedule_rho=7', '--coeff=1.15', '--num_warmup=4', '--max_order=4')      # named, and the same
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / 'ok' / 'run.json').read_text())['t_steps'] == saved['schedules']['5']
    before = listing(tmp_path)
    for args, flag in ((['--dataset_name=gmm'], '--dataset_name'), (['--solver=euler'], '--solver'),
                       (['--max_order=3'], '--max_order'), (['--afs=True'], '--afs'),
                       (['--schedule_rho=5'], '--schedule_rho'), (['--schedule_type=logsnr'], '--schedule_type'),
                       (['--sigma_max=50'], '--sigma_max'), (['--coeff=2'], '--coeff'),
                       (['--num_warmup=8'], '--num_warmup'), (['--search=student'], '--search'),
                       (['--save_schedules=x.json'], '--save_schedules')):
        dataset = [] if flag == '--dataset_name' else ['--dataset_name=digits']
        r = run_here(sample.main, *dataset, *use, *args, f'--outdir={tmp_path / "no"}', cwd=tmp_path)
        assert_one_line_error(r, flag)
        assert str(path) in r.stderr or flag == '--save_schedules', r.stderr
    # Files that are not schedule files.
    (tmp_path / 'text.json').write_text('not json')
    (tmp_path / 'other.json').write_text('{"format": "something else"}')
    del saved['coeff']
    (tmp_path / 'old.json').write_text(json.dumps(saved))     # a file that does not record --coeff
    for name, args in (('text.json', []), ('other.json', []), ('missing.json', []), ('old.json', ['--coeff=1.15'])):
        r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', '--num_steps=5', f'--schedule_file={tmp_path / name}',
                     *args, f'--outdir={tmp_path / "no"}')
        assert_one_line_error(r, '--coeff' if args else '--schedule_file')
        assert "('schedules')" not in r.stderr
    assert listing(tmp_path) == sorted(before + ['text.json', 'other.json', 'old.json'])


BAD = [
    (['--metric=bdev'], '--metric'),
    (['--num_steps_tea=5', '--num_steps=7'], '--num_steps_tea'),
    (['--coeff=0'], '--coeff'),
    (['--coeff=-1'], '--coeff'),
    (['--num_warmup', '0'], '--num_warmup'),
    (['--t_steps=[80,1,0.002]'], '--dp'),
    (['--warmup_seed=0', '--seeds=0-3'], '--warmup_seed'),
    (['--schedule_file=s.json'], '--dp'),
    (['--save_schedules=s.json', '--save_num_steps=1-3'], '--save_num_steps'),
    (['--save_schedules=s.json', '--save_num_steps=a'], '--save_num_steps'),
]


@pytest.mark.parametrize('args,flag', BAD)
def test_bad_gits_flags(tmp_path, args, flag):
    import sample
    outdir = [] if any(a.startswith('--save_schedules') for a in args) else [f'--outdir={tmp_path / "o"}']
    r = run_here(sample.main, '--dataset_name=digits', '--solver=heun', '--dp=True', *args, *outdir, cwd=tmp_path)
    assert_one_line_error(r, flag)
    assert listing(tmp_path) == []
