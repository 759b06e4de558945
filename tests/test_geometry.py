"""geometry.py and `trajectory.py geometry`: Frenet-Serret curvature and torsion of a helix and of a
planar curve against their closed forms, total rotation, Procrustes, and the command end to end."""

import json
import math
import os

import pytest
import torch

import geometry
import trajectory
from helpers import assert_one_line_error, run_here


def rotation_matrix(seed, k=3):
    q, r = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(r.diagonal())


def test_helix_curvature_torsion_and_rotation():
    # r(t) = (a cos t, a sin t, b t), rotated and shifted: kappa = a / (a^2 + b^2),
    # tau = b / (a^2 + b^2), |omega| = 1 / sqrt(a^2 + b^2), ds = sqrt(a^2 + b^2) dt. The points are
    # spaced unevenly in t (the fit must use arc length, not the index).
    a, b = 2.0, 0.5
    t = torch.linspace(0, 1, 241, dtype=torch.float64) ** 1.5 * 6
    helix = torch.stack([a * torch.cos(t), a * torch.sin(t), b * t], 1) @ rotation_matrix(0) + 3.0
    s, kappa, tau = geometry.curvature_torsion(helix, window=7)
    c = a * a + b * b
    torch.testing.assert_close(s[-1], torch.tensor(6 * math.sqrt(c), dtype=torch.float64), rtol=1e-3, atol=0)
    # A centered cubic fit is accurate inside; the one-sided fits of the first and last points less so.
    inner = slice(3, -3)
    torch.testing.assert_close(kappa[inner], torch.full_like(kappa[inner], a / c), rtol=2e-3, atol=0)
    torch.testing.assert_close(tau[inner], torch.full_like(tau[inner], b / c), rtol=2e-3, atol=0)
    torch.testing.assert_close(kappa, torch.full_like(kappa, a / c), rtol=3e-2, atol=0)
    torch.testing.assert_close(tau, torch.full_like(tau, b / c), rtol=3e-2, atol=0)
    # Mirrored, the helix turns the other way: the torsion changes sign, the curvature does not.
    _, kappa_m, tau_m = geometry.curvature_torsion(helix * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64), 7)
    torch.testing.assert_close(kappa_m, kappa, rtol=1e-9, atol=0)
    torch.testing.assert_close(tau_m, -tau, rtol=1e-9, atol=1e-12)
    rot = geometry.total_rotation(s, kappa, tau)
    assert rot[0] == 0 and (rot[1:] >= rot[:-1]).all()
    assert float(rot[-1]) == pytest.approx(6.0, rel=1e-2)        # t runs over 6 radians


def test_planar_curve_has_zero_torsion():
    # An ellipse arc in a tilted plane of R^3: tau = 0, kappa = a b / (a^2 sin^2 t + b^2 cos^2 t)^(3/2).
    # The curvature varies along it, so a cubic fit has an error that falls as the points get denser:
    # second order in the spacing (a quarter at twice the points).
    a, b = 3.0, 1.0
    worst = []
    for n in (121, 241):
        t = torch.linspace(0.2, 3.0, n, dtype=torch.float64)
        flat = torch.stack([a * torch.cos(t), b * torch.sin(t), torch.zeros_like(t)], 1)
        curve = flat @ rotation_matrix(1) - 1.0
        s, kappa, tau = geometry.curvature_torsion(curve, window=7)
        expected = a * b / (a * a * torch.sin(t) ** 2 + b * b * torch.cos(t) ** 2) ** 1.5
        worst.append(float(((kappa - expected) / expected).abs().max()))
        assert tau.abs().max() < 1e-6 * kappa.min()
    assert worst[0] < 3e-2 and worst[1] < 6e-3 and 3 < worst[0] / worst[1] < 7
    # A straight line neither bends nor twists.
    line = torch.linspace(0, 1, 20, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 2.0, -2.0]], dtype=torch.float64)
    _, k_line, t_line = geometry.curvature_torsion(line, 5)
    assert k_line.abs().max() < 1e-9 and (t_line == 0).all()


def test_points_that_do_not_move_are_left_out():
    t = torch.linspace(0, 2, 30, dtype=torch.float64)
    curve = torch.stack([torch.cos(t), torch.sin(t), 0.1 * t], 1)
    settled = torch.cat([curve, curve[-1:].expand(5, 3)])          # a denoising trajectory that has stopped
    s, kappa, tau = geometry.curvature_torsion(settled, 7)
    assert torch.isnan(kappa[-5:]).all() and torch.isfinite(kappa[:-5]).all()
    rot = geometry.total_rotation(s, kappa, tau)
    assert torch.isfinite(rot).all() and (rot[-5:] == rot[-6]).all()
    with pytest.raises(ValueError, match='--window'):
        geometry.local_derivatives(curve, geometry.arc_length(curve), window=3)


def test_procrustes_recovers_a_known_rotation():
    g = torch.Generator().manual_seed(2)
    for k in (2, 3):
        a = torch.randn(40, k, generator=g, dtype=torch.float64)
        rot = rotation_matrix(3 + k, k)
        torch.testing.assert_close(geometry.procrustes(a, a @ rot), rot, rtol=0, atol=1e-12)
        noisy = a @ rot + 1e-3 * torch.randn(40, k, generator=g, dtype=torch.float64)
        torch.testing.assert_close(geometry.procrustes(a, noisy), rot, rtol=0, atol=1e-3)
    # Rotated copies of one trajectory align onto it exactly; a different one does not.
    base = torch.randn(15, 3, generator=g, dtype=torch.float64)
    coords = torch.stack([base, base @ rotation_matrix(7), torch.randn(15, 3, generator=g, dtype=torch.float64)], 1)
    aligned, residual = geometry.align_to_reference(coords, 0)
    torch.testing.assert_close(aligned[:, 1], base, rtol=0, atol=1e-12)
    assert residual[0] == 0.0 and residual[1] < 1e-12 and 0.3 < residual[2] < 1


def test_chord_frame_in_2d_is_the_first_rows_of_3d():
    g = torch.Generator().manual_seed(4)
    points = torch.randn(12, 3, 30, generator=g, dtype=torch.float64).cumsum(0)
    b3, s3 = geometry.projection_basis(points, 3)
    b2, s2 = geometry.projection_basis(points, 2)
    torch.testing.assert_close(b2, b3[:, :2], rtol=0, atol=1e-12)
    assert all(x <= y + 1e-12 for x, y in zip(s2, s3))
    assert trajectory.projection_basis is geometry.projection_basis       # trajectory.py's names kept


def test_geometry_command(tmp_path):
    out = tmp_path / 'geo'
    args = ['--dataset_name=digits', '--seeds=0-3', '--num_steps=21', '--window=5', '--device=cpu']
    r = run_here(trajectory.main, 'geometry', *args, f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    for name in ('curvature.png', 'rotation.png', 'procrustes.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    rec = json.loads((out / 'geometry.json').read_text())
    assert rec['seeds'] == [0, 1, 2, 3] and rec['window'] == 5 and len(rec['t_steps']) == 21
    for key in ('sampling', 'denoising'):
        kappa = torch.tensor([[float('nan') if v is None else v for v in row] for row in rec[key]['kappa']])
        assert kappa.shape == (4, 21)
        frac = rec[key]['rotation_fraction']['median']
        assert frac[0] == 0 and frac[-1] == pytest.approx(1)
        assert rec[key]['procrustes']['3d']['residual_ratio'][0] == 0
        assert rec[key]['procrustes']['3d']['median_deviation_share'] >= rec[key]['procrustes']['2d']['median_deviation_share']
    # The JSON's kappa of seed 0 is geometry.py's on the recorded trajectory.
    import models
    from torch_utils.seeds import draw_seed_inputs
    model = models.load('digits')
    noise, _ = draw_seed_inputs([0, 1], model.shape, 0)
    xs, _ = trajectory.record_trajectories(model.denoise, noise.float(), torch.tensor(rec['t_steps'], dtype=torch.float64))
    ours = geometry.trajectory_geometry(xs.flatten(2), 5)['kappa'][0]
    torch.testing.assert_close(ours, torch.tensor(rec['sampling']['kappa'][0], dtype=torch.float64), rtol=1e-6, atol=0)
    # Refusals: one line each, naming the flag; a folder written with other flags is refused.
    for bad, flag in ((['--window=3'], '--window'), (['--seeds=0'], '--seeds'), (['--window=30'], '--window')):
        r = run_here(trajectory.main, 'geometry', *args, *bad, f'--outdir={tmp_path / "bad"}')
        assert_one_line_error(r, flag)
        assert not (tmp_path / 'bad').exists()
    assert_one_line_error(run_here(trajectory.main, 'geometry', *args[:-2], '--window=7', '--device=cpu',
                                   f'--outdir={out}'), '--outdir')
