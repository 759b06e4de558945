"""The four time schedules and the --t_steps text form."""

import math

import pytest
import torch

import schedules
import solvers
from models.discrete import DiscreteVPModel, linear_alphas_cumprod


def _decreasing(t, n, smin, smax):
    assert t.dtype == torch.float64 and t.shape == (n,)
    assert (t[1:] < t[:-1]).all() and (t > 0).all()
    assert float(t[0]) == pytest.approx(smax, rel=1e-12) and float(t[-1]) == pytest.approx(smin, rel=1e-12)


@pytest.mark.parametrize('n', [2, 7, 61])
def test_polynomial(n):
    t = schedules.get_schedule(n, 0.002, 80, 'polynomial', 7)
    _decreasing(t, n, 0.002, 80)
    k = torch.arange(n, dtype=torch.float64) / (n - 1)    # EDM's formula
    edm = (80 ** (1 / 7) + k * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(t, edm, rtol=1e-14, atol=0)
    torch.testing.assert_close(schedules.get_schedule(n, 0.5, 10, 'polynomial', 1), torch.linspace(10, 0.5, n, dtype=torch.float64))


def test_logsnr():
    t = schedules.get_schedule(9, 0.002, 80, 'logsnr')
    _decreasing(t, 9, 0.002, 80)
    steps = t.log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(0.002 / 80) / 8), rtol=1e-12, atol=0)


@pytest.mark.parametrize('rho', [1.0, 2.0])
def test_time_uniform(rho):
    beta_d, beta_min = schedules.vp_coefficients(0.002, 80)
    # The VP map takes eps = 1e-3 to sigma_min and 1 to sigma_max, and vp_sigma_inv inverts it.
    assert float(schedules.vp_sigma(1e-3, beta_d, beta_min)) == pytest.approx(0.002, rel=1e-9)
    assert float(schedules.vp_sigma(1.0, beta_d, beta_min)) == pytest.approx(80, rel=1e-12)
    t = schedules.get_schedule(9, 0.002, 80, 'time_uniform', rho)
    _decreasing(t, 9, 0.002, 80)
    vp_t = schedules.vp_sigma_inv(t, beta_d, beta_min)
    torch.testing.assert_close(schedules.vp_sigma(vp_t, beta_d, beta_min), t, rtol=1e-10, atol=0)
    grid = vp_t ** (1 / rho)          # uniform from 1 to eps^(1/rho)
    torch.testing.assert_close(grid.diff(), torch.full_like(grid.diff(), (1e-3 ** (1 / rho) - 1) / 8), rtol=1e-7, atol=0)
    # numpy vp_time (used by DEIS tAB) agrees with vp_sigma_inv
    torch.testing.assert_close(torch.from_numpy(schedules.vp_time(t.numpy(), beta_d, beta_min)), vp_t, rtol=1e-12, atol=0)


class GmmAsDiscrete(DiscreteVPModel):
    """A discrete-time VP wrapper (linear betas, 1000 steps) whose eps-network is the gmm's exact
    denoiser, so its own denoise(x, sigma) equals the gmm's at every sigma."""

    def __init__(self, gmm):
        super().__init__(linear_alphas_cumprod())
        self.gmm = gmm

    def eps(self, x_vp, t, **cond):
        sigma = float(self.sigma(t[0]))
        x = x_vp * (1 + sigma ** 2) ** 0.5
        return (x - self.gmm.denoise(x, sigma)) / sigma


@pytest.mark.parametrize('rho', [1.0, 2.0])
def test_discrete(rho, gmm):
    model = GmmAsDiscrete(gmm)
    smin, smax = model.sigma_min, model.sigma_max
    t = schedules.get_schedule(11, smin, smax, 'discrete', rho, model=model)
    _decreasing(t, 11, smin, smax)
    steps = model.sigma_inv(t) ** (1 / rho)             # uniform in the model's own time^(1/rho)
    torch.testing.assert_close(steps.diff(), torch.full_like(steps.diff(), float(steps[-1] - steps[0]) / 10),
                               rtol=1e-6, atol=1e-9)
    # With a sigma range inside the model's: the ends are the requested ones.
    _decreasing(schedules.get_schedule(6, 0.05, 20, 'discrete', 1, model=model), 6, 0.05, 20)
    # The wrapper is the gmm denoiser up to the sigma -> t -> sigma round trip (DiscreteVPModel
    # hands the network float32 timesteps, ~1e-7 relative, so sigma moves by ~1e-5), and sampling
    # it on its discrete schedule converges to the gmm's exact flow.
    lo, hi = 0.05, 20.0
    x = torch.randn([1, *gmm.shape], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * hi
    torch.testing.assert_close(model.denoise(x, 3.0), gmm.denoise(x, 3.0), rtol=1e-3, atol=1e-5)
    exact = gmm.exact(x, hi, lo, rtol=1e-7, atol=1e-7)
    errors = [float((solvers.heun(model.denoise, x, schedules.get_schedule(n, lo, hi, 'discrete', rho, model=model))
                     - exact).square().mean().sqrt()) for n in (6, 21)]
    assert errors[1] * 10 < errors[0], errors


@pytest.mark.parametrize('args, flag', [
    (dict(schedule_type='cosine'), '--schedule_type'),
    (dict(num_steps=1), '--num_steps'),
    (dict(sigma_min=80, sigma_max=0.002), '--sigma_min'),
    (dict(schedule_type='discrete'), '--schedule_type'),               # no discrete model
    (dict(schedule_type='time_uniform', sigma_min=0.5, sigma_max=10), '--schedule_type'),   # no valid VP map
    (dict(schedule_rho=0.0), '--schedule_rho'),
])
def test_schedule_errors(args, flag):
    kw = dict(num_steps=5, sigma_min=0.002, sigma_max=80, schedule_type='polynomial', schedule_rho=7.0)
    kw.update(args)
    with pytest.raises(ValueError) as e:
        schedules.get_schedule(**kw)
    assert str(e.value).startswith(flag) and '\n' not in str(e.value)


def test_t_steps_text():
    t = schedules.get_schedule(7, 0.002, 80)
    text = schedules.format_t_steps(t)
    assert ' ' not in text and text.startswith('[') and text.endswith(']')
    assert schedules.parse_t_steps(text) == [float(v) for v in t]        # exact round trip
    assert schedules.parse_t_steps('80,10.9836,3.8811,1.584,0.5666,0.1698,0.002')[1] == 10.9836
    for bad in ['[80,x,1]', '[80]', '[80,-1]', '[1,2]', '[80,80,1]', '[80,,1]', '[inf,1]']:
        with pytest.raises(ValueError, match='--t_steps'):
            schedules.parse_t_steps(bad)
