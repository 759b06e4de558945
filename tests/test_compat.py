"""compat='gits-main': every solver and option reproduces the official GITS code (zju-pi/diff-sampler,
gits-main) against an independent reference written from its formulas (gits_main_reference), with
the same denoiser calls, and refuses what the official code crashes on. Also the thresholding
option, the official schedules, and the measured orders of the official variants."""

import math

import numpy as np
import pytest
import torch

import gits_main
import schedules
import solver_utils as su
import solvers
from reference import gits_main_reference as official
from test_solvers import CONFIGS      # every solver with every option combination

COMPAT = 'gits-main'

SCHEDULES = {     # 3, 6 and 11 time points: polynomial, a rough GITS-like one, logsnr
    3: tuple(schedules.get_schedule(3, 0.002, 80, 'polynomial', 7).tolist()),
    6: (80.0, 10.9836, 3.8811, 1.584, 0.1698, 0.002),
    11: tuple(schedules.get_schedule(11, 0.002, 80, 'logsnr').tolist()),
}


class Counting:
    def __init__(self, denoise):
        self.denoise, self.calls = denoise, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoise(x, sigma)


@pytest.fixture(scope='module')
def start(gmm):
    g = torch.Generator().manual_seed(3)
    return torch.randn([2, *gmm.shape], generator=g, dtype=torch.float64) * 80


def _assert_rows_close(ours, theirs, rtol, msg):
    assert len(ours) == len(theirs), msg
    for k, (a, b) in enumerate(zip(ours, theirs)):
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= rtol, (msg, k, err)


@pytest.mark.parametrize('name, opt', CONFIGS, ids=[f'{n}-{o}' for n, o in CONFIGS])
def test_matches_official_reference(name, opt, gmm, start):
    """Trajectory (every t_steps point and D(x_last) with denoise_to_zero) to 1e-6 relative,
    denoiser calls equal to the reference's and to count_nfe, for afs off/on and 3, 6, 11 points;
    where the reference (the official code) crashes, one ValueError line naming the flag, from
    the solver and from resolve_options."""
    fn = solvers.SOLVERS[name]
    for n, ts in SCHEDULES.items():
        for afs in (False, True):
            msg = (n, afs)
            theirs_den, ours_den = Counting(gmm.denoise), Counting(gmm.denoise)
            try:
                theirs = official.sample(name, theirs_den, start, ts, afs=afs, denoise_to_zero=True, **opt)
            except official.OfficialCrash:
                for call in (lambda: fn(ours_den, start, torch.tensor(ts, dtype=torch.float64), afs=afs, compat=COMPAT, **opt),
                             lambda: solvers.resolve_options(name, opt, COMPAT, num_points=n)):
                    with pytest.raises(ValueError) as e:
                        call()
                    text = str(e.value)
                    assert '\n' not in text and text.split(':')[0] in ('--max_order', '--deis_mode'), text
                    assert 'gits-main' in text
                assert ours_den.calls == 0
                continue
            _, ours = fn(ours_den, start, torch.tensor(ts, dtype=torch.float64), afs=afs, denoise_to_zero=True, return_inters=True,
                         compat=COMPAT, **opt)
            _assert_rows_close(ours, theirs, 1e-6, msg)
            assert ours_den.calls == theirs_den.calls == solvers.count_nfe(name, n, afs=afs, denoise_to_zero=True,
                                                                           compat=COMPAT, **opt), msg


def test_official_crashes_are_the_expected_ones():
    """The reference fails exactly where reading the official code says it does (so the test
    above checks refusals, not a broken reference): max_order=1 for ipndm/ipndm_v/deis (history
    buffer), DEIS rhoAB with max_order 2 from 4 points and max_order 3 from 5 points; rhoAB with
    max_order 4 runs on any length."""
    den = lambda x, s: 0 * x
    x = torch.ones(1, 1, 2, 2)
    ts = lambda n: schedules.get_schedule(n, 0.5, 10, 'logsnr')
    for name in ('ipndm', 'ipndm_v', 'deis'):
        with pytest.raises(official.OfficialCrash):
            official.sample(name, den, x, ts(3), max_order=1)
    for max_order, first_crash in ((2, 4), (3, 5)):
        official.sample('deis', den, x, ts(first_crash - 1), max_order=max_order, deis_mode='rhoab')
        with pytest.raises(official.OfficialCrash):
            official.sample('deis', den, x, ts(first_crash), max_order=max_order, deis_mode='rhoab')
        assert gits_main.deis_rhoab_failure(first_crash - 1, max_order) is None
        assert gits_main.deis_rhoab_failure(first_crash, max_order).startswith('--deis_mode')
    official.sample('deis', den, x, ts(12), max_order=4, deis_mode='rhoab')
    assert gits_main.deis_rhoab_failure(100, 4) is None


def test_rhoab_max_order_4_reuses_step_3():
    """Official rhoAB max_order 4: steps 4, 5, ... reuse step 3's weights, so it diverges from
    the correct method, which compat=None keeps (= ipndm_v)."""
    ts = tuple(schedules.get_schedule(11, 0.002, 80, 'logsnr').tolist())
    table = gits_main.deis_rhoab_table(ts, 4)
    correct = su.adams_table(ts, 4, 'sigma')
    assert table[:4] == correct[:4]
    assert all(row == correct[3] for row in table[4:]) and table[4] != correct[4]


@pytest.mark.parametrize('max_order, points, extra', [(2, 2, 1), (3, 2, 1), (3, 3, 1), (2, 3, 0), (3, 4, 0), (1, 2, 0)])
def test_unipc_nfe_short_schedules(max_order, points, extra, gmm, start):
    """The official corrects the last step when it is still in the warm-up: one more
    evaluation (counted by count_nfe, made by the solver, and by the reference)."""
    ts = schedules.get_schedule(points, 0.002, 80)
    for afs in (False, True):
        expected = points - 1 + extra - int(afs)
        assert solvers.count_nfe('unipc', points, afs=afs, compat=COMPAT, max_order=max_order) == expected
        assert solvers.count_nfe('unipc', points, afs=afs, max_order=max_order) == points - 1 - int(afs)
        ours, theirs = Counting(gmm.denoise), Counting(gmm.denoise)
        solvers.unipc(ours, start, ts, afs=afs, compat=COMPAT, max_order=max_order)
        official.sample('unipc', theirs, start, ts, afs=afs, max_order=max_order)
        assert ours.calls == theirs.calls == expected


def test_short_schedule_orders():
    """With 3 points and max_order 3 the official warm-up ignores lower_order_final (order 2 on
    the last step); everywhere else the two order rules agree."""
    assert su.step_orders(2, 3, True) == [1, 1]
    assert gits_main.step_orders(2, 3, True) == [1, 2]
    for n in range(1, 12):
        for p in (1, 2, 3):          # lower_order_final is an option of dpmpp and unipc (max_order <= 3)
            for lof in (False, True):
                if (n, p, lof) != (2, 3, True):
                    assert su.step_orders(n, p, lof) == gits_main.step_orders(n, p, lof), (n, p, lof)


# ----------------------------------------------------------------------------------------------
# Bad input.

def test_bad_compat_and_refusals():
    x, ts = torch.zeros(1, 1, 2, 2), torch.tensor([2.0, 1.0, 0.5])
    for call in (lambda: solvers.resolve_options('euler', {}, 'foo'),
                 lambda: solvers.euler(lambda x_, s: x_, x, ts, compat='foo'),
                 lambda: solvers.count_nfe('euler', 3, compat='foo'),
                 lambda: schedules.get_schedule(5, 0.002, 80, compat='foo')):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith('--compat:') and 'gits-main' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ValueError, match='^--max_order: the official gits-main ipndm_v crashes'):
        solvers.resolve_options('ipndm_v', dict(max_order=1), COMPAT)
    assert solvers.resolve_options('ipndm_v', dict(max_order=1)) == dict(max_order=1)
    with pytest.raises(ValueError, match='^--deis_mode: the official gits-main DEIS rhoab crashes with max_order=3'):
        solvers.resolve_options('deis', dict(max_order=3, deis_mode='rhoab'), COMPAT, num_points=5)
    solvers.resolve_options('deis', dict(max_order=3, deis_mode='rhoab'), COMPAT, num_points=4)


# ----------------------------------------------------------------------------------------------
# Thresholding.

def test_dynamic_threshold_formula():
    """Against the reference's sort-based quantile, and its defining properties: per sample,
    identity when the 0.995-quantile of |D| is at most 1 (then only the 0.5% tail is clamped to
    [-1, 1]), otherwise a scaling into [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    D = torch.randn([4, 3, 8, 8], generator=g, dtype=torch.float64) * torch.tensor([0.2, 0.5, 3.0, 10.0]).reshape(-1, 1, 1, 1).double()
    out = su.dynamic_threshold(D)
    torch.testing.assert_close(out, official.threshold(D), rtol=1e-14, atol=1e-14)
    assert torch.equal(out[0], D[0])                       # all |D| < 1: untouched
    assert float(out.abs().max()) <= 1
    s = torch.quantile(D[3].abs().flatten(), 0.995)
    torch.testing.assert_close(out[3], D[3].clamp(-s, s) / s)
    # one sample's result does not depend on the rest of the batch
    torch.testing.assert_close(su.dynamic_threshold(D[2:3]), out[2:3], rtol=0, atol=0)


def test_thresholding_option(gmm, start):
    """thresholding=True outside compat thresholds exactly as the official (checked on options
    whose tables are the same in both modes), changes the result, and is off by default."""
    ts = torch.tensor(SCHEDULES[6], dtype=torch.float64)
    for name, opt in (('dpmpp', dict(max_order=2)), ('unipc', dict(max_order=2)), ('unipc', dict(max_order=3))):
        fn = solvers.SOLVERS[name]
        on = fn(gmm.denoise, start, ts, thresholding=True, **opt)
        torch.testing.assert_close(on, fn(gmm.denoise, start, ts, compat=COMPAT, **opt), rtol=1e-12, atol=1e-12)
        off = fn(gmm.denoise, start, ts, **opt)
        assert torch.equal(off, fn(gmm.denoise, start, ts, thresholding=False, **opt))
        assert float((on - off).abs().max()) > 1e-2


@pytest.mark.parametrize('solver, options, compat', [
    ('ipndm', dict(thresholding=True), None),
    ('euler', dict(thresholding=False), None),
    ('deis', dict(thresholding=True), COMPAT),
    ('dpmpp', dict(thresholding=True, predict_x0=False), None),
    ('unipc', dict(thresholding=True, predict_x0=False), COMPAT),
    ('dpmpp', dict(thresholding=False), COMPAT),        # the official always thresholds
])
def test_thresholding_refused(solver, options, compat):
    with pytest.raises(ValueError) as e:
        solvers.resolve_options(solver, options, compat)
    assert str(e.value).startswith('--thresholding:') and '\n' not in str(e.value)


def test_thresholding_resolved_defaults():
    r = solvers.resolve_options
    assert r('dpmpp', {})['thresholding'] is False and r('unipc', {})['thresholding'] is False
    assert r('dpmpp', {}, COMPAT)['thresholding'] is True and r('unipc', {}, COMPAT)['thresholding'] is True
    assert r('dpmpp', dict(predict_x0=False), COMPAT)['thresholding'] is False
    assert r('unipc', dict(thresholding=True))['thresholding'] is True
    assert 'thresholding' not in r('ipndm', {}, COMPAT)


# ----------------------------------------------------------------------------------------------
# DEIS tAB coefficients: the float32 Riemann rule.

def test_deis_tab_coefficients_float32_rule():
    """Our official-tAB weights equal the reference's (the official float32 computation, step by
    step) to float32 round-off, on a rough schedule and a 61-point teacher grid; and they are that
    computation's, not a nearby one: the same Riemann rule with VP times computed in float64 (what
    this code did before) moves the last step's weights by over 1e-5 of a row's largest weight, and
    the exact integrals (our quadrature in the same float32 VP map) differ by over 1e-5."""
    rough = (80.0, 10.9836, 3.8811, 1.584, 0.5666, 0.1698, 0.002)
    teacher = tuple(schedules.get_schedule(61, 0.002, 80, compat=COMPAT).tolist())
    for ts in (rough, teacher):
        for i, (a, w) in enumerate(gits_main.deis_tab_table(ts, 4)):
            expect = official._deis_tab_coefficients(list(ts), i, len(w))
            err = max(abs(u - v) for u, v in zip(w, expect)) / max(abs(v) for v in w)
            assert err <= 1e-6, (len(ts), i, err)
    beta_d, beta_min = (float(v) for v in gits_main.vp_coefficients_f32(*gits_main.DEIS_RANGE))
    taus64 = schedules.vp_time(np.asarray(rough), beta_d, beta_min)
    worst_f64, worst_exact = 0.0, 0.0
    for i, (a, w) in enumerate(gits_main.deis_tab_table(rough, 4)):
        if len(w) == 1:
            continue
        scale = max(abs(v) for v in w)
        f64 = gits_main.deis_tab_weights(torch.tensor(taus64, dtype=torch.float64), i, len(w),
                                         *gits_main.deis_vp_times(rough)[1:])
        worst_f64 = max(worst_f64, max(abs(u - v) for u, v in zip(w, f64)) / scale)
        exact = su.lagrange_weights(rough, i, len(w), 'vp_time', 'eps', (beta_d, beta_min))
        worst_exact = max(worst_exact, max(abs(u - v) for u, v in zip(w, exact)) / scale)
    assert worst_f64 > 1e-5, worst_f64
    assert worst_exact > 1e-5, worst_exact


# ----------------------------------------------------------------------------------------------
# Measured orders of the official variants (gmm from sigma 10 to 0.5, smooth grid graded at the
# start, lower_order_final off). Ours reach their orders (test_solvers.test_convergence_order).

@pytest.fixture(scope='module')
def order_problem(gmm):
    g = torch.Generator().manual_seed(1)
    x = torch.randn([4, *gmm.shape], generator=g, dtype=torch.float64) * 10
    return x, gmm.exact(x, 10.0, 0.5, rtol=1e-11, atol=1e-11)


def _graded_log_sigma(n):
    v = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    return (math.log(10) + (math.log(0.5) - math.log(10)) * (2 * v ** 2 - v ** 3)).exp()


@pytest.mark.parametrize('name, opt, order', [
    # The published DPM-Solver++(3M) update (D2 weighted by half): second order. Noise
    # prediction, since the official thresholds every data prediction (a different ODE).
    ('dpmpp', dict(max_order=3, predict_x0=False, lower_order_final=False), 2),
    # iPNDM-v order 4: rows do not sum to 1 on grids with varying step ratios: second order.
    ('ipndm_v', dict(max_order=4), 2),
    # iPNDM-v order 3 (missing parenthesis): still third order on smooth grids.
    ('ipndm_v', dict(max_order=3), 3),
])
def test_official_variant_orders(name, opt, order, gmm, order_problem):
    x, exact = order_problem
    fn = solvers.SOLVERS[name]
    errors = [float((fn(gmm.denoise, x, _graded_log_sigma(m), compat=COMPAT, **opt) - exact).square().mean().sqrt())
              for m in (64, 128)]
    measured = math.log2(errors[0] / errors[1])
    assert abs(measured - order) <= 0.35, (errors, measured)


# ----------------------------------------------------------------------------------------------
# The official schedules.

def test_official_schedules_float32():
    """polynomial and logsnr: our formulas evaluated in float32 (the official's dtype), within
    1e-5 of ours; time_uniform: float32 log(1 + 0.002^2) = log(1 + 34 ulps) moves the last point
    to sqrt(34 * 2^-23) = 0.0020132."""
    for kind, rho in (('polynomial', 7.0), ('logsnr', 7.0), ('polynomial', 3.0)):
        ours = schedules.get_schedule(9, 0.002, 80, kind, rho)
        theirs = schedules.get_schedule(9, 0.002, 80, kind, rho, compat=COMPAT)
        assert theirs.dtype == torch.float64
        assert torch.equal(theirs, theirs.float().double())         # float32 values
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0)
    k = np.arange(9, dtype=np.float32) / np.float32(8)
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    poly32 = (np.float32(a) + k * np.float32(b - a)) ** np.float32(7)
    torch.testing.assert_close(schedules.get_schedule(9, 0.002, 80, compat=COMPAT), torch.from_numpy(poly32).double(),
                               rtol=3e-7, atol=0)
    tu = schedules.get_schedule(9, 0.002, 80, 'time_uniform', 2.0, compat=COMPAT)
    assert float(tu[-1]) == pytest.approx(math.sqrt(34 * 2.0 ** -23), rel=1e-6)
    assert float(tu[-1]) / 0.002 - 1 > 6e-3
    torch.testing.assert_close(tu[:-2], schedules.get_schedule(9, 0.002, 80, 'time_uniform', 2.0)[:-2], rtol=2e-4, atol=0)


def test_official_discrete_schedule(gmm):
    """rho acts on continuous time t = (index + 1) / T in [1/T, 1]: t^(1/rho) is uniform. For
    rho = 1 that is our schedule (an affine change of time); for rho = 2 the noise levels are up
    to 38% apart (with linear betas over 1000 steps; ours ends uniform in sqrt(index) at index 0)."""
    from test_schedules import GmmAsDiscrete
    model = GmmAsDiscrete(gmm)
    T = model.num_timesteps
    smin, smax = model.sigma_min, model.sigma_max
    for rho in (1.0, 2.0):
        theirs = schedules.get_schedule(11, smin, smax, 'discrete', rho, model=model, compat=COMPAT)
        t = (model.sigma_inv(theirs) + 1) / T
        steps = t ** (1 / rho)
        torch.testing.assert_close(steps.diff(), torch.full_like(steps.diff(), float(steps[-1] - steps[0]) / 10),
                                   rtol=1e-6, atol=1e-9)
        assert float(t[0]) == pytest.approx(1.0) and float(t[-1]) == pytest.approx(1 / T)
        ours = schedules.get_schedule(11, smin, smax, 'discrete', rho, model=model)
        apart = float(((theirs - ours) / ours).abs()[1:-1].max())
        if rho == 1.0:
            assert apart < 1e-9
        else:
            assert 0.3 < apart < 0.45, apart
