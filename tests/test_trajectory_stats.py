"""`trajectory.py stats` and trajectory_stats.py: the per-seed statistics against a direct
computation, their summaries, and the same result for any batch size and process count."""

import json
import os

import numpy as np
import pytest
import torch

import schedules
import trajectory
import trajectory_stats
from helpers import assert_one_line_error, run_here, torchrun
from torch_utils.seeds import seed_batch

ARGS = ['stats', '--dataset_name=gmm_wavelet', '--seeds=0-4,2', '--solver=heun', '--num_steps=6', '--device=cpu']


def test_seed_statistics_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    t_steps = torch.tensor([10.0, 3.0, 1.0, 0.2], dtype=torch.float64)
    xs, dens = torch.randn(2, 4, 3, 7, generator=g, dtype=torch.float64).unbind(0)     # [N, B, D] each
    out = trajectory.seed_statistics(xs, dens, t_steps)
    assert out.shape == (3, len(trajectory.STATISTICS), 4)
    for b in range(3):
        for i, t in enumerate(t_steps.tolist()):
            x, d = xs[i, b].numpy(), dens[i, b].numpy()
            eps, to_end = (x - d) / t, x - xs[-1, b].numpy()
            chord = xs[-1, b].numpy() - xs[0, b].numpy()
            rel = x - xs[0, b].numpy()
            off_chord = np.linalg.norm(rel - rel @ chord / (chord @ chord) * chord)
            drel, dchord = d - dens[0, b].numpy(), dens[-1, b].numpy() - dens[0, b].numpy()
            d_off = np.linalg.norm(drel - drel @ dchord / (dchord @ dchord) * dchord)
            cos = eps @ to_end / (np.linalg.norm(eps) * np.linalg.norm(to_end)) if i < 3 else np.nan
            expected = [np.linalg.norm(x), np.linalg.norm(d), np.linalg.norm(eps), off_chord, d_off, cos]
            np.testing.assert_allclose(out[b, :, i].numpy(), expected, rtol=1e-12, atol=1e-12)
    # On a trajectory x_t = x_0 + t n with D = x_0 the noise estimate is n and points along x_t - x_0.
    x0, n = torch.randn(2, 1, 5, generator=g, dtype=torch.float64)
    line = x0 + t_steps[:, None, None] * n
    out = trajectory.seed_statistics(line, x0.expand_as(line), t_steps)
    np.testing.assert_allclose(out[0, 2].numpy(), n.norm().item(), rtol=1e-12)
    np.testing.assert_allclose(out[0, 3].numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(out[0, 5, :-1].numpy(), 1, rtol=1e-12)


def test_summaries_are_per_point_and_null_where_undefined():
    v = np.random.default_rng(0).normal(size=(11, 3))
    v[4, 2] = np.nan
    s = trajectory_stats.summarize(v)
    np.testing.assert_allclose(s['mean'][:2], v[:, :2].mean(0), rtol=1e-15)
    np.testing.assert_allclose(s['q25'][:2], np.quantile(v[:, :2], 0.25, axis=0), rtol=1e-15)
    assert set(s) == {'mean', 'std', 'q05', 'q25', 'q50', 'q75', 'q95'}
    assert all(s[k][2] is None for k in s)


def read_run(out):
    rec = json.load(open(os.path.join(out, 'stats.json')))
    with np.load(os.path.join(out, 'per_seed.npz')) as f:
        return rec, {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp('stats') / 'one'
    r = run_here(trajectory.main, *ARGS, '--batch=6', f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    return out


def test_stats_do_not_depend_on_the_batch_and_equal_fresh_trajectories(tmp_path, one_process, gmm_wavelet):
    rec, per_seed = read_run(one_process)
    r = run_here(trajectory.main, *ARGS, '--batch=2', f'--outdir={tmp_path}')
    assert r.returncode == 0, r.stderr
    rec2, per_seed2 = read_run(tmp_path)
    assert rec2['statistics'] == rec['statistics'] and rec['num_seeds'] == 6
    assert per_seed['seeds'].tolist() == [0, 1, 2, 3, 4, 2]
    for k in per_seed:
        np.testing.assert_array_equal(per_seed2[k], per_seed[k])
    # Seed by seed, the statistics of trajectories traced in one batch.
    t_steps = schedules.get_schedule(6, 0.002, 80)
    noise, denoise = seed_batch(gmm_wavelet, [0, 1, 2, 3, 4, 2], 'cpu')
    xs, dens = trajectory.record_trajectories(denoise, noise, t_steps, 'heun')
    ref = trajectory.seed_statistics(xs.flatten(2), dens.flatten(2), t_steps)
    for q, name in enumerate(trajectory.STATISTICS):
        np.testing.assert_allclose(per_seed[name], ref[:, q].numpy(), rtol=1e-6, atol=1e-6)
    assert rec['statistics']['cosine_noise_estimate']['mean'][-1] is None
    assert rec['statistics']['norm_x']['q50'][0] == pytest.approx(float(np.median(ref[:, 0, 0])))
    assert os.path.getsize(tmp_path / 'stats.png') > 10_000


def test_two_processes_give_one_process_result(tmp_path, one_process):
    r = torchrun('trajectory.py', 2, *ARGS, '--batch=2', f'--outdir={tmp_path}')
    assert r.returncode == 0, r.stderr
    rec, per_seed = read_run(one_process)
    rec2, per_seed2 = read_run(tmp_path)
    assert rec2['statistics'] == rec['statistics']
    for k in per_seed:
        np.testing.assert_array_equal(per_seed2[k], per_seed[k])


def test_stats_refusals(tmp_path, one_process):
    assert_one_line_error(run_here(trajectory.main, *ARGS, '--seeds=a', f'--outdir={tmp_path}'), '--seeds')
    pasted = [a for a in ARGS if not a.startswith('--num_steps')]
    assert_one_line_error(run_here(trajectory.main, *ARGS, '--t_steps=[80,1,0.1]', f'--outdir={tmp_path}'), '--num_steps')
    assert_one_line_error(run_here(trajectory.main, *pasted, '--t_steps=[80,1,5]', f'--outdir={tmp_path}'), '--t_steps')
    assert_one_line_error(run_here(trajectory.main, *pasted, '--t_steps=[80,1,0.1]', '--schedule_rho=3',
                                   f'--outdir={tmp_path}'), '--schedule_rho')
    assert_one_line_error(run_here(trajectory.main, *ARGS, '--batch=0', f'--outdir={tmp_path}'), '--batch')
    assert os.listdir(tmp_path) == []
    before = sorted(os.listdir(one_process))
    assert_one_line_error(run_here(trajectory.main, *ARGS, '--num_steps=7', f'--outdir={one_process}'), '--outdir')
    assert sorted(os.listdir(one_process)) == before
