"""The embedded analytic models: exact denoisers (Tweedie's formula) and the reference ODE solver."""

import math

import pytest
import torch

import schedules
import solvers
from models.analytic import WaveletMixture, haar2d, ihaar2d


def log_density_gmm(model, x, sigma):
    var = model.stds ** 2 + sigma ** 2
    sq = (x[:, None, :] - model.means[None]).square().sum(-1)
    d = x.shape[1]
    return torch.logsumexp(model.log_weights - 0.5 * d * torch.log(2 * math.pi * var) - 0.5 * sq / var, dim=1)


def log_density_wavelet(model, x, sigma):
    """Through the orthonormal Haar transform (Jacobian 1), a mixture of diagonal Gaussians."""
    var = model.variances + sigma ** 2
    y = haar2d(x.reshape(-1, *model.shape)).reshape(x.shape[0], 1, -1)
    terms = torch.log(2 * math.pi * var) + (y - model.means[None]).square() / var
    return torch.logsumexp(model.log_weights - 0.5 * terms.sum(-1), dim=1)


def log_density_digits(model, x, sigma):
    sq = (x[:, None, :] - model.data[None]).square().sum(-1)
    return torch.logsumexp(-0.5 * sq / sigma ** 2, dim=1)


@pytest.mark.parametrize('name,logp', [('gmm', log_density_gmm), ('gmm_wavelet', log_density_wavelet),
                                       ('digits', log_density_digits)])
@pytest.mark.parametrize('sigma', [0.05, 0.7, 12.0])
def test_denoiser_is_tweedie(request, name, logp, sigma):
    """D(x; s) = x + s^2 grad log p_s(x) for the noised density p_s, computed here by autograd."""
    model = request.getfixturevalue(name)
    g = torch.Generator().manual_seed(3)
    x0 = model.sample_data(4, g) if name != 'digits' else model.data[:4].reshape(4, *model.shape)
    x = (x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    grad, = torch.autograd.grad(logp(model, x.reshape(4, -1), sigma).sum(), x)
    expected = x.detach() + sigma ** 2 * grad
    got = model.denoise(x.detach(), sigma)
    assert torch.allclose(got, expected, atol=1e-9 * max(1, sigma ** 2), rtol=1e-9)


def test_denoiser_batch_invariant(gmm, gmm_wavelet, digits):
    """A sample's output must not depend on the other samples in its batch (byte-identical images)."""
    for model in (gmm, gmm_wavelet, digits):
        x = torch.randn(40, *model.shape, generator=torch.Generator().manual_seed(0)) * 3
        full = model.denoise(x, 1.3)
        parts = torch.cat([model.denoise(x[i:i + 7], 1.3) for i in range(0, 40, 7)])
        assert torch.equal(full, parts)


@pytest.mark.parametrize('name', ['gmm', 'gmm_wavelet', 'digits'])
def test_exact_is_converged(request, name):
    """The adaptive reference agrees with a 100x tighter run to ~1e-8 (error budget of every solver
    comparison in the suite)."""
    model = request.getfixturevalue(name)
    x = torch.randn(3, *model.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    a = model.exact(x, 80, 0.002)
    b = model.exact(x, 80, 0.002, rtol=1e-11, atol=1e-11)
    assert (a - b).abs().max() < 1e-7


@pytest.mark.parametrize('name', ['gmm', 'digits'])
def test_heun_many_steps_matches_exact(request, name):
    """Heun is second order: with 400 polynomial steps its global error is O(h^2) ~ 1e-5 of the
    data scale; we require RMSE < 1e-4 (data in [-1, 1])."""
    model = request.getfixturevalue(name)
    x = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    t = schedules.get_schedule(400, 0.002, 80)
    out = solvers.heun(model.denoise, x, t)
    ref = model.exact(x, 80, 0.002)
    assert (out - ref).square().mean().sqrt() < 1e-4


def test_euler_heun_convergence_orders(gmm):
    """Error ratio when the number of steps doubles: 2 for first order, 4 for second order."""
    x = torch.randn(4, *gmm.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 80
    ref = gmm.exact(x, 80, 0.002)

    def err(fn, n):
        return float((fn(gmm.denoise, x, schedules.get_schedule(n + 1, 0.002, 80)) - ref).square().mean().sqrt())

    for fn, order in ((solvers.euler, 1), (solvers.heun, 2)):
        e1, e2 = err(fn, 64), err(fn, 128)
        assert abs(math.log2(e1 / e2) - order) < 0.3, (fn.__name__, e1, e2)


def test_exact_lands_on_data_for_digits(digits):
    x = torch.randn(4, *digits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 80
    y = digits.exact(x, 80, 0.002).reshape(4, 1, -1)
    dist = (y - digits.data[None]).norm(dim=-1).min(dim=1).values
    assert (dist < 0.05).all()


def test_haar_is_orthonormal():
    """haar2d is an orthogonal matrix (its rows, the images of the unit vectors, are orthonormal)
    and ihaar2d its transpose: the noised wavelet mixture is the mixture with lam + sigma^2."""
    eye = torch.eye(2 * 8 * 8, dtype=torch.float64).reshape(-1, 2, 8, 8)
    h = haar2d(eye).reshape(128, 128)
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(ihaar2d(eye).reshape(128, 128), h.T, atol=1e-15)
    # Not the identity in disguise: level by level, averages and differences of pixel blocks.
    assert (h.abs() > 1e-12).sum() > 4 * 128


def test_wavelet_samples_have_the_component_statistics():
    model = WaveletMixture(num_components=1)
    x = model.sample_data(2000, torch.Generator().manual_seed(6))
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.float64
    z = (model.to_wavelet(x.reshape(2000, -1)) - model.means) / model.variances.sqrt()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.square().mean()) - 1) < 0.01


def test_wavelet_exact_matches_closed_form():
    """One component: the ODE moves each wavelet coordinate as sqrt(lam + sigma^2), exactly."""
    model = WaveletMixture(num_components=1)
    x = torch.randn(3, 3 * 32 * 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 80
    for s_from, s_to in ((80, 0.002), (2.0, 0.01)):
        ratio = ((model.variances + s_to ** 2) / (model.variances + s_from ** 2)).sqrt()
        want = model.from_wavelet(model.means + (model.to_wavelet(x) - model.means) * ratio)
        got = model.exact(x.reshape(3, *model.shape), s_from, s_to).reshape(3, -1)
        assert (got - want).abs().max() < 1e-7, (s_from, s_to)


def slope_turning(model, sigma_below, num=4):
    """Mean over trajectories of the total angle (degrees) the slope dx/dsigma turns through
    below `sigma_below`, on a fine iPNDM run."""
    x = torch.randn(num, *model.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 80
    t = schedules.get_schedule(61, 0.002, 80)
    _, xs = solvers.ipndm(model.denoise, x, t, return_inters=True)
    slopes = torch.stack([((xs[i] - model.denoise(xs[i], float(t[i]))) / t[i]).reshape(num, -1)
                          for i in range(len(t)) if t[i] < sigma_below])
    cos = torch.nn.functional.cosine_similarity(slopes[:-1], slopes[1:], dim=-1).clamp(-1, 1)
    return float(torch.rad2deg(torch.arccos(cos)).sum(0).mean())


def test_wavelet_trajectories_curve_where_gmm_is_straight(gmm, gmm_wavelet):
    """Below sigma 1 every gmm trajectory has settled in one isotropic component: a straight line
    through its mean (the blind spot of GITS's dev cost). gmm_wavelet's keep turning there."""
    assert slope_turning(gmm, 1.0) < 0.1
    assert slope_turning(gmm_wavelet, 1.0) > 10
