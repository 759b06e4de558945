"""models/empirical.py and `trajectory.py dataset / optimal`: the optimal (kernel) denoiser against
the exact digits denoiser, the fitted Gaussian, low-rank Gaussian and mixture denoisers against
their closed forms (and the Gaussian's ODE against its exact solution), the --data reader, the
command end to end and its one-line refusals."""

import json
import os

import numpy as np
import pytest
import scipy.stats
import torch

import schedules
import solvers
import trajectory
from helpers import assert_one_line_error, listing, run_here
from models import analytic, empirical
from torch_utils import misc
from torch_utils.seeds import seed_batch

SIGMAS = (80.0, 5.0, 0.5, 0.05, 0.002)


def test_kernel_denoiser_equals_the_exact_digits_denoiser(digits):
    data = analytic.load_digits_data()
    g = torch.Generator().manual_seed(0)
    kernel = empirical.KernelDenoiser(data, chunk=500)         # 4 blocks, the last one partial
    whole = empirical.KernelDenoiser(data, chunk=len(data))
    for sigma in SIGMAS:
        x = data[100:106] + sigma * torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
        out = kernel.denoise(x, sigma)
        torch.testing.assert_close(out, digits.denoise(x, sigma), rtol=0, atol=1e-12)
        torch.testing.assert_close(out, whole.denoise(x, sigma), rtol=0, atol=1e-13)
    # At the smallest noise level every point is denoised to the data point it came from.
    torch.testing.assert_close(kernel.denoise(data[100:106] + 1e-4, 0.002), data[100:106], rtol=0, atol=1e-12)


def direct_gaussian(flat, x, sigma, rank=None):
    """mean + C (C + s^2 I)^-1 (x - mean) with C the data's covariance (1/N), or its top-`rank`
    part plus the mean of the other eigenvalues on the rest of the space."""
    mean = flat.mean(0)
    c = np.cov(flat.T, bias=True)
    if rank is not None:
        lam, vec = np.linalg.eigh(c)
        lam, vec = lam[::-1], vec[:, ::-1]
        nu = lam[rank:].sum() / (len(lam) - rank)
        c = vec[:, :rank] @ np.diag(lam[:rank]) @ vec[:, :rank].T + nu * (np.eye(len(lam)) - vec[:, :rank] @ vec[:, :rank].T)
    return mean + (c @ np.linalg.solve(c + sigma ** 2 * np.eye(len(mean)), (x - mean).T)).T, c


@pytest.mark.parametrize('num', [50, 4])          # more points than dimensions, and fewer (a singular C)
def test_gaussian_and_lowrank_denoisers_match_the_closed_form(num):
    g = torch.Generator().manual_seed(num)
    dim = 6
    data = (torch.randn(num, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g, dtype=torch.float64)
            + torch.arange(dim, dtype=torch.float64)).reshape(num, 1, 2, 3)
    x = 3 * torch.randn(5, 1, 2, 3, generator=g, dtype=torch.float64)
    flat, xf = data.reshape(num, -1).numpy(), x.reshape(5, -1).numpy()
    full, low = empirical.fit_gaussian(data), empirical.fit_gaussian(data, rank=2)
    for sigma in (3.0, 0.3, 0.02):
        ref, _ = direct_gaussian(flat, xf, sigma)
        np.testing.assert_allclose(full.denoise(x, sigma).reshape(5, -1).numpy(), ref, rtol=0, atol=1e-10)
        ref_low, _ = direct_gaussian(flat, xf, sigma, rank=2)
        out_low = low.denoise(x, sigma).reshape(5, -1).numpy()
        np.testing.assert_allclose(out_low, ref_low, rtol=0, atol=1e-10)
        assert np.abs(out_low - ref).max() > 1e-3                    # the rank matters


def test_gaussian_trajectory_is_the_exact_linear_ode_solution():
    # For N(mean, C) the ODE moves each eigen-coordinate of x - mean like sqrt(lam + sigma^2).
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(40, 8, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1.5, 8, dtype=torch.float64)
            @ torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0] + 0.3).reshape(40, 2, 2, 2)
    fit = empirical.fit_gaussian(data)
    flat = data.reshape(40, -1).numpy()
    lam, vec = np.linalg.eigh(np.cov(flat.T, bias=True))
    x0 = 80 * torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)

    def exact(sigma):
        z = (x0.reshape(3, -1).numpy() - flat.mean(0)) @ vec
        return flat.mean(0) + (z * np.sqrt((lam + sigma ** 2) / (lam + 80.0 ** 2))) @ vec.T

    reference = analytic.solve_pf_ode(fit.denoise, x0, 80.0, 0.002, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(reference.reshape(3, -1).numpy(), exact(0.002), rtol=0, atol=1e-7)
    # Any solver runs on a fitted denoiser: Heun converges to the same end point.
    t_steps = schedules.get_schedule(201, 0.002, 80)
    out = solvers.SOLVERS['heun'](fit.denoise, x0, t_steps).reshape(3, -1).numpy()
    err = np.abs(out - exact(0.002)).max()
    assert err < 1e-3 * np.abs(exact(0.002)).max(), err


def test_mixture_denoiser_matches_the_direct_posterior_mean():
    g = torch.Generator().manual_seed(5)
    dim, sizes = 5, (30, 20, 3)                                       # the last class spans 2 of 5 dims
    parts = [torch.randn(n, dim, generator=g, dtype=torch.float64) * (0.2 + 0.3 * k) + 2 * k for k, n in enumerate(sizes)]
    data = torch.cat(parts).reshape(-1, 1, 1, dim)
    labels = torch.cat([torch.full([n], 7 + k) for k, n in enumerate(sizes)])
    fit = empirical.fit_mixture(data, labels)
    x = 2 * torch.randn(6, 1, 1, dim, generator=g, dtype=torch.float64) + 2
    xf = x.reshape(6, -1).numpy()
    for sigma in (3.0, 0.3, 0.05):
        logits, outs = [], []
        for k, p in enumerate(parts):
            den, c = direct_gaussian(p.numpy(), xf, sigma)
            cov = c + sigma ** 2 * np.eye(dim)
            logits.append(np.log(len(p) / len(data)) + scipy.stats.multivariate_normal(p.numpy().mean(0), cov).logpdf(xf))
            outs.append(den)
        w = np.exp(np.array(logits) - np.max(logits, 0))
        w /= w.sum(0)
        ref = sum(w[k][:, None] * outs[k] for k in range(len(parts)))
        np.testing.assert_allclose(fit.denoise(x, sigma).reshape(6, -1).numpy(), ref, rtol=0, atol=1e-9)


def test_dataset_zip_round_trip(tmp_path):
    r = run_here(trajectory.main, 'dataset', '--dataset_name=digits', f'--dest={tmp_path / "digits.zip"}')
    assert r.returncode == 0, r.stderr
    data, labels = empirical.read_dataset(str(tmp_path / 'digits.zip'), (1, 8, 8))
    from sklearn.datasets import load_digits
    assert labels.tolist() == load_digits().target.tolist()
    assert (data - analytic.load_digits_data()).abs().max() <= 0.5 / 127.5 + 1e-12       # 8-bit PNGs
    # Colour images without labels: read back in the 3-channel shape, labels None.
    images = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    (tmp_path / 'rgb.zip').write_bytes(empirical.dataset_zip(images))
    back, none = empirical.read_dataset(str(tmp_path / 'rgb.zip'), (3, 4, 4))
    assert none is None and (back - images).abs().max() <= 0.5 / 127.5 + 1e-12


@pytest.fixture(scope='module')
def digits_zip(tmp_path_factory):
    path = tmp_path_factory.mktemp('data') / 'digits.zip'
    r = run_here(trajectory.main, 'dataset', '--dataset_name=digits', f'--dest={path}')
    assert r.returncode == 0, r.stderr
    return path


def test_optimal_command_on_digits(tmp_path, digits_zip, digits):
    out = tmp_path / 'opt'
    args = ['optimal', '--dataset_name=digits', f'--data={digits_zip}', '--seeds=3,4,5', '--batch=2', '--solver=euler',
            '--num_steps=6', '--analytic=gaussian,mixture', '--num_plots=2', f'--outdir={out}', '--device=cpu']
    r = run_here(trajectory.main, *args)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ['optimal.json', 'optimal.png', 'per_seed.npz', 'samples.png']
    rec = json.load(open(out / 'optimal.json'))
    assert rec['data_size'] == 1797 and rec['num_classes'] == 10 and rec['num_seeds'] == 3
    assert list(rec['trajectory_rmse']) == ['optimal', 'gaussian', 'mixture']
    for name in rec['trajectory_rmse']:
        assert rec['trajectory_rmse'][name]['mean'][0] == 0.0                  # the same starting point
    # The recorded figures are the fitted denoisers' runs against the model's, seed by seed.
    data, labels = empirical.read_dataset(str(digits_zip), (1, 8, 8))
    t_steps = schedules.get_schedule(6, 0.002, 80)
    noise, denoise = seed_batch(digits, [3, 4, 5], 'cpu')
    ref = solvers.SOLVERS['euler'](denoise, noise * 80, t_steps)
    per_seed = np.load(out / 'per_seed.npz')
    assert per_seed['seeds'].tolist() == [3, 4, 5]
    for name, fit in [('optimal', empirical.KernelDenoiser(data)), ('mixture', empirical.fit_mixture(data, labels))]:
        final = misc.per_seed_rmse(solvers.SOLVERS['euler'](fit.denoise, noise * 80, t_steps), ref)
        np.testing.assert_allclose(per_seed[f'trajectory_rmse_{name}'][:, -1], final, rtol=1e-5, atol=1e-7)
        assert rec['final_rmse'][name]['mean'][0] == pytest.approx(float(final.mean()), rel=1e-5, abs=1e-7)
    # The optimal denoiser of the (8-bit) data set is the model's denoiser up to the quantisation.
    assert max(rec['denoiser_gap']['optimal']['mean']) < 0.5 / 127.5
    assert max(rec['denoiser_gap']['gaussian']['mean']) > 10 * max(rec['denoiser_gap']['optimal']['mean'])
    # A rerun with other flags is refused and leaves the folder as it was.
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert_one_line_error(run_here(trajectory.main, *args[:-2], '--seeds=0-1', f'--outdir={out}', '--device=cpu'),
                          '--outdir')
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_optimal_and_dataset_refusals(tmp_path, digits_zip):
    unlabelled = tmp_path / 'unlabelled.zip'
    unlabelled.write_bytes(empirical.dataset_zip(analytic.load_digits_data()[:20]))
    rgb = tmp_path / 'rgb.zip'
    rgb.write_bytes(empirical.dataset_zip(torch.linspace(-1, 1, 3).reshape(1, 3, 1, 1).expand(4, 3, 8, 8)))
    out = tmp_path / 'out'
    base = ['optimal', '--dataset_name=digits', '--seeds=0', '--num_steps=4', f'--outdir={out}', '--device=cpu']
    cases = [
        ([f'--data={unlabelled}'], '--analytic'),                              # mixture needs labels
        ([f'--data={digits_zip}', '--analytic=gaussian,cubic'], '--analytic'),
        ([f'--data={digits_zip}', '--analytic=gaussian,gaussian'], '--analytic'),
        ([f'--data={digits_zip}', '--analytic=gaussian', '--rank=4'], '--rank'),
        ([f'--data={digits_zip}', '--rank=64'], '--rank'),
        ([f'--data={rgb}'], '--data'),                                           # colour images, gray model
        ([f'--data={tmp_path / "missing.zip"}'], '--data'),
        ([f'--data={digits_zip}', '--seeds=3-1'], '--seeds'),
    ]
    for extra, flag in cases:
        assert_one_line_error(run_here(trajectory.main, *base, *extra), flag)
    small = tmp_path / 'small.zip'
    small.write_bytes(empirical.dataset_zip(torch.zeros(4, 1, 4, 4)))
    assert_one_line_error(run_here(trajectory.main, *base, f'--data={small}'), '--data')   # 4x4, model 8x8
    assert_one_line_error(run_here(trajectory.main, 'dataset', '--dataset_name=digits', '--num=5',
                                   f'--dest={tmp_path / "d.zip"}'), '--num')
    assert_one_line_error(run_here(trajectory.main, 'dataset', '--dataset_name=cifar10',
                                   f'--dest={tmp_path / "d.zip"}'), '--dataset_name')
    assert not out.exists() and not (tmp_path / 'd.zip').exists()
    assert listing(tmp_path) == ['rgb.zip', 'small.zip', 'unlabelled.zip']          # nothing half-written
