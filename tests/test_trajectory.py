"""trajectory.py: the deviation geometry against closed forms, the recorded denoising trajectory
against fresh evaluations, and both CLI commands end to end on the analytic models."""

import json
import os

import pytest
import torch

import gits
from torch_utils.seeds import draw_seed_inputs
import schedules
import trajectory
from helpers import assert_one_line_error, run_cli


def test_line_deviation_of_a_parabola():
    # Points (s, a s (1 - s)) in a random 2-D plane of R^50: the chord is the first axis, so the
    # distance from the start-end line is exactly a s (1 - s).
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 2, generator=g, dtype=torch.float64))
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    a = torch.tensor([0.5, 3.0], dtype=torch.float64)                        # two trajectories
    coords = torch.stack([s[:, None].expand(11, 2), a * s[:, None] * (1 - s[:, None])], -1)   # [N, B, 2]
    offset = torch.randn(2, 50, generator=g, dtype=torch.float64)
    points = coords @ q.T * 7 + offset                                        # scaled by 7, shifted
    dev = trajectory.line_deviation(points)
    assert dev.shape == (11, 2)
    torch.testing.assert_close(dev, 7 * a * s[:, None] * (1 - s[:, None]), rtol=1e-12, atol=1e-12)

    basis, shares = trajectory.projection_basis(points)
    assert basis.shape == (2, 3, 50)
    torch.testing.assert_close(basis[0] @ basis[0].T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert shares == pytest.approx([1.0, 1.0], abs=1e-12)                  # planar: all deviation in 1 dir
    proj = trajectory.project(points, points[0], basis)
    # The 3-D coordinates keep the distances from the start (the curve lies in the basis' span).
    torch.testing.assert_close(proj.norm(dim=-1), (points - points[0]).norm(dim=-1), rtol=1e-12, atol=1e-12)


def test_recorded_denoising_trajectory_matches_fresh_evaluations(digits):
    noise = torch.randn(3, *digits.shape, generator=torch.Generator().manual_seed(1))
    t_steps = schedules.get_schedule(9, 0.002, 80)
    xs, dens = trajectory.record_trajectories(digits.denoise, noise, t_steps, 'heun')
    assert xs.shape == dens.shape == (9, 3, *digits.shape)
    for i, t in enumerate(t_steps):
        fresh = digits.denoise(xs[i].float(), float(t)).double()
        torch.testing.assert_close(dens[i], fresh, rtol=0, atol=1e-6)       # float32 outputs


def test_analyze_digits_profile_and_figures(tmp_path):
    out = tmp_path / 'traj'
    r = run_cli('trajectory.py', 'analyze', '--dataset_name=digits', '--seeds=0-5', '--solver=heun',
                '--num_steps=21', f'--outdir={out}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    for name in ('profile.png', 'traj_3d.png'):
        with open(out / name, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
        assert os.path.getsize(out / name) > 10_000
    rec = json.load(open(out / 'trajectory.json'))
    assert rec['seeds'] == list(range(6)) and len(rec['t_steps']) == 21
    for key in ('sampling', 'denoising'):
        dev = torch.tensor(rec[key]['deviation'], dtype=torch.float64)       # [B, N]
        chord = torch.tensor(rec[key]['chord_length'], dtype=torch.float64)
        assert dev.shape == (6, 21)
        assert (dev[:, 0] == 0).all()                                        # exact at the start
        assert (dev[:, -1] <= 1e-9 * chord).all()                            # round-off at the end
        assert (dev[:, 1:-1] > 0).all()
    # Boomerang: the sampling trajectory bends away and comes back, by a small fraction of its length.
    rel = torch.tensor(rec['sampling']['relative_deviation'])
    peak = rel.argmax(1)
    assert ((peak > 0) & (peak < 20)).all()
    assert ((rel.max(1).values > 1e-4) & (rel.max(1).values < 0.05)).all()
    assert min(rec['sampling']['top2_deviation_share']) > 0.9
    # The JSON agrees with a direct computation on a re-recorded trajectory of seed 0.
    import models
    model = models.load('digits')
    noise, _ = draw_seed_inputs([0], model.shape, 0)
    t_steps = torch.tensor(rec['t_steps'], dtype=torch.float64)
    xs, _ = trajectory.record_trajectories(model.denoise, noise.float(), t_steps, 'heun')
    expected = torch.tensor(rec['sampling']['deviation'][0], dtype=torch.float64)
    torch.testing.assert_close(trajectory.line_deviation(xs.flatten(2))[:, 0], expected, rtol=1e-9, atol=1e-9)


def test_schedules_command_matches_gits_search(tmp_path):
    out = tmp_path / 'sched'
    args = ['--dataset_name=digits', '--solver=euler', '--num_steps=5', '--num_warmup=6', '--solver_tea=euler',
            '--num_steps_tea=13', '--warmup_seed=5000']
    r = run_cli('trajectory.py', 'schedules', *args, '--error_seeds=0-1', f'--outdir={out}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(out / 'schedules.png') > 10_000
    rec = json.load(open(out / 'schedules.json'))
    assert set(rec['schedules']) == {'polynomial', 'logsnr', 'time_uniform', 'gits'}
    for name, ts in rec['schedules'].items():
        assert len(ts) == 5 and ts[0] == pytest.approx(80) and ts[-1] == pytest.approx(0.002)
        assert rec['nfe'][name] == 4 and rec['errors'][name] > 0
    # The plotted GITS schedule is the one sample.py --dp would use with the same warm-up noise.
    import models
    model = models.load('digits')
    noise, _ = draw_seed_inputs(range(5000, 5006), model.shape, 0)
    ref = gits.search_schedule(model.denoise, noise.float(), num_steps=5, sigma_min=0.002, sigma_max=80,
                               solver_tea='euler', num_steps_tea=13, solver='euler')
    assert rec['schedules']['gits'] == [float(t) for t in ref]
    assert rec['schedules']['polynomial'] == [float(t) for t in schedules.get_schedule(5, 0.002, 80)]


def test_bad_flags_are_one_line_errors(tmp_path):
    assert_one_line_error(run_cli('trajectory.py', 'analyze', '--dataset_name=nope', f'--outdir={tmp_path}'),
                          '--dataset_name')
    assert_one_line_error(run_cli('trajectory.py', 'analyze', '--dataset_name=digits', '--t_steps=[80,1,5]',
                                  f'--outdir={tmp_path}'), '--t_steps')
    assert_one_line_error(run_cli('trajectory.py', 'schedules', '--dataset_name=digits', '--num_steps=9',
                                  '--num_steps_tea=5', f'--outdir={tmp_path}'), '--num_steps_tea')


def test_throughput_benchmark_smoke(tmp_path):
    """benchmarks/throughput.py on a narrow SongUNet: sample.py's loop makes exactly the bare loop's
    denoiser calls and writes every image; its network config is the CIFAR-10 checkpoint's."""
    import sys
    from conftest import ROOT, SPECS
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    import throughput
    with open(os.path.join(SPECS, 'edm-cifar10-32x32-uncond-vp.json')) as f:
        assert throughput.CIFAR10_KWARGS == json.load(f)['network_kwargs']
    out = tmp_path / 'tp.json'
    r = run_cli('benchmarks/throughput.py', '--device=cpu', '--solvers=ipndm,heun', '--batch=3', '--num_steps=3',
                '--seed_counts=3,7', '--model_channels=16', '--threads=1', f'--out={out}')
    assert r.returncode == 0, r.stderr
    rec = json.load(open(out))
    assert [row['solver'] for row in rec['rows']] == ['ipndm', 'heun']
    assert [row['nfe'] for row in rec['rows']] == [2, 4]
    for row in rec['rows']:
        first, second = row['runs']
        assert first['seeds'] == 3 and second['seeds'] == 7
        assert first['bare_s'] > 0 and first['denoiser_s'] <= first['loop_s']
    assert '| ipndm | 2 | 3 | 3 |' in rec['table']
