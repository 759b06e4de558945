"""Schedule presets (ComfyUI's GITS table for SD v1.5, Align Your Steps) and the export of
schedules to diffusers' and ComfyUI's forms (issue 17).

Published values: ComfyUI comfy_extras/nodes_gits.py and nodes_align_your_steps.py; the AYS
timesteps [999, 850, ...] are those on NVIDIA's AYS page. The GITS table was searched on SD's
sigmas at timesteps 999 k / 100, so every entry must be such a sigma (2.7e-5 relative, float32
arithmetic); a mistyped digit in the first five moves it off that grid.
"""

import json

import numpy as np
import pytest
import torch

import gits
import schedule_io
import schedule_presets as presets
import schedules
from helpers import assert_one_line_error, run_cli
from models.discrete import DiscreteVPModel, scaled_linear_alphas_cumprod


@pytest.fixture(scope='module')
def sd_schedule():
    """Stable Diffusion's discrete schedule (the wrapper's sigma(t) and sigma_inv), no network."""
    return DiscreteVPModel(scaled_linear_alphas_cumprod(0.00085, 0.012))


def decreasing(values):
    return all(b < a for a, b in zip(values, values[1:])) and values[-1] > 0


# ----------------------------------------------------------------------------------------------
# Presets against the published tables.

def test_gits_table_layout_and_spot_values(sd_schedule):
    table = presets.GITS_SD15
    assert [f'{c:.2f}' for c in table] == [f'{0.80 + 0.05 * i:.2f}' for i in range(15)]
    for rows in table.values():
        assert [len(r) for r in rows] == list(range(3, 22))          # 2..20 steps
        assert all(decreasing(r) and r[0] == 14.61464119 and r[-1] == 0.02916753 for r in rows)
    # Spot values, copied from the published file.
    assert table[0.80][0] == [14.61464119, 7.49001646, 0.02916753]
    assert table[1.20][8] == [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048,
                              0.50118381, 0.32104823, 0.19894916, 0.09824532, 0.02916753]
    assert table[1.25][18][7] == 0.66947293 and table[1.30][12][5] == 0.77538133
    assert table[1.50][18][1:4] == [2.45070267, 1.41535246, 0.95350921]
    assert table[1.05][17][2:4] == [8.30717278, 7.11996698]
    # Every entry is SD's sigma at a timestep 999 k / 100 (the GITS teacher grid).
    values = torch.tensor(sorted({v for rows in table.values() for r in rows for v in r}), dtype=torch.float64)
    k = torch.round(sd_schedule.sigma_inv(values) / 9.99)
    torch.testing.assert_close(sd_schedule.sigma(k * 9.99), values, rtol=1e-4, atol=0)
    # Defaults are ComfyUI's node defaults: coeff 1.20, 10 steps.
    assert presets.preset_t_steps('gits_sd15') == table[1.20][8]
    assert presets.preset_t_steps('gits_sd15:coeff=0.9:steps=4') == table[0.90][2]
    assert presets.preset_t_steps('gits_sd15:steps=20:coeff=1.50') == table[1.50][18]


def test_ays_tables_are_sd_sigmas_at_the_published_timesteps(sd_schedule):
    assert presets.preset_t_steps('ays_sd15') == presets.AYS['sd15']
    assert presets.AYS['sd15'][3] == 2.6946151520 and presets.AYS['sdxl'][3] == 2.1811480769
    for name, timesteps in (('sd15', [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0]),
                            ('sdxl', [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0])):
        torch.testing.assert_close(sd_schedule.sigma(torch.tensor(timesteps)),
                                   torch.tensor(presets.AYS[name], dtype=torch.float64), rtol=1e-8, atol=0)


@pytest.mark.parametrize('text,base', [('ays_sd15:steps=20', presets.AYS['sd15']),
                                       ('ays_sdxl:steps=20', presets.AYS['sdxl']),
                                       ('gits_sd15:coeff=1.15:steps=40', presets.GITS_SD15[1.15][18])])
def test_other_step_counts_interpolate_log_linearly(text, base):
    """Twice the steps: every other point is the published one, the rest geometric means of
    their neighbours (log sigma linear in between), ends exact."""
    t = presets.preset_t_steps(text)
    assert len(t) == 2 * len(base) - 1 and decreasing(t)
    np.testing.assert_allclose(t[::2], base, rtol=1e-14)
    np.testing.assert_allclose(t[1::2], np.sqrt(np.array(base[:-1]) * np.array(base[1:])), rtol=1e-14)
    assert (t[0], t[-1]) == (base[0], base[-1])


def test_fewer_steps_and_other_counts():
    assert presets.preset_t_steps('ays_sd15:steps=5') == presets.AYS['sd15'][::2]
    assert presets.preset_t_steps('ays_sd15:steps=1') == [presets.AYS['sd15'][0], presets.AYS['sd15'][-1]]
    t = presets.preset_t_steps('ays_sd15:steps=7')
    assert len(t) == 8 and decreasing(t)
    log = np.log(presets.AYS['sd15'])          # the point at fraction 1/7 of the published curve
    x = 10 / 7
    assert t[1] == pytest.approx(np.exp(log[1] + (x - 1) * (log[2] - log[1])), rel=1e-14)


def test_presets_parse_wherever_t_steps_is():
    assert schedules.parse_t_steps('gits_sd15:coeff=1.20:steps=6') == presets.GITS_SD15[1.20][4]
    assert schedules.parse_t_steps('[3,2,1]') == [3.0, 2.0, 1.0]
    for bad, match in (('foo', 'unknown preset "foo"; presets: gits_sd15, ays_sd15, ays_sdxl'),
                       ('gits_sd15:coeff=1.23', 'coeff must be one of 0.80, 0.85'),
                       ('gits_sd15:steps=1', 'steps must be an integer in 2..1000'),
                       ('ays_sd15:coeff=1.2', 'ays_sd15 takes steps='),
                       ('ays_sd15:steps', 'ays_sd15 takes steps=')):
        with pytest.raises(ValueError, match=match) as e:
            schedules.parse_t_steps(bad)
        assert str(e.value).startswith('--t_steps:') and '\n' not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Export.

@pytest.fixture(scope='module')
def searched(digits):
    """A GITS schedule searched here (public API), on the presets' sigma range."""
    latents = torch.randn([16, *digits.shape], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return gits.search_schedule(digits.denoise, latents, num_steps=7, sigma_min=0.02916753, sigma_max=14.61464119,
                                num_steps_tea=21)


def test_diffusers_sigmas_round_trip(searched):
    for t in (searched, torch.tensor(presets.preset_t_steps('ays_sd15:steps=7'), dtype=torch.float64)):
        sigmas = json.loads(json.dumps(schedule_io.diffusers_sigmas(t)))       # as written to run.json
        back = schedule_io.from_diffusers_sigmas(sigmas)
        assert back.dtype == torch.float64
        torch.testing.assert_close(back, t, rtol=1e-12, atol=0)
        # diffusers' own schedules end with an appended 0: read back without it.
        torch.testing.assert_close(schedule_io.from_diffusers_sigmas(sigmas + [0.0]), t, rtol=1e-12, atol=0)


def test_comfyui_form_ends_in_zero_and_matches_comfyui_nodes(searched):
    t = presets.preset_t_steps('gits_sd15:coeff=1.20:steps=10')
    comfy = schedule_io.comfyui_sigmas(t)
    # ComfyUI's GITSScheduler: the same row with sigmas[-1] = 0; same length, same step count.
    assert comfy == presets.GITS_SD15[1.20][8][:-1] + [0.0]
    comfy = schedule_io.comfyui_sigmas(searched)
    assert comfy[-1] == 0.0 and len(comfy) == len(searched) and comfy[:-1] == [float(v) for v in searched[:-1]]
    torch.testing.assert_close(schedule_io.from_comfyui_sigmas(comfy, float(searched[-1])), searched, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match='ends in 0'):
        schedule_io.from_comfyui_sigmas(comfy[:-1], 0.03)


def test_diffusers_timesteps_of_a_discrete_model(sd_schedule):
    t = torch.tensor(presets.preset_t_steps('ays_sd15'), dtype=torch.float64)
    out = schedule_io.exports(t, sd_schedule)['diffusers']
    # The AYS sigmas are SD's at AYS's integer timesteps: the export finds exactly those.
    assert out['timesteps'] == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]     # the last point is appended by the scheduler
    np.testing.assert_allclose(out['timesteps_exact'], [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0], atol=1e-5)
    torch.testing.assert_close(sd_schedule.sigma(torch.tensor(out['timesteps_exact'], dtype=torch.float64)), t,
                               rtol=1e-12, atol=0)
    # Fractional timesteps round to the nearest; the sigmas they stand for are reported.
    t = torch.tensor(presets.preset_t_steps('gits_sd15:steps=6'), dtype=torch.float64)
    out = schedule_io.exports(t, sd_schedule)['diffusers']
    assert out['timesteps'] == [999, 829, 569, 340, 150, 30]
    assert all(abs(a - b) <= 0.5 for a, b in zip(out['timesteps'], out['timesteps_exact']))
    torch.testing.assert_close(torch.tensor(out['timesteps_sigmas'], dtype=torch.float64),
                               sd_schedule.sigma(torch.tensor(out['timesteps'])), rtol=0, atol=0)
    # Two points inside one timestep have no integer form.
    close = torch.tensor([10.0, 9.99999, 0.5], dtype=torch.float64)
    out = schedule_io.exports(close, sd_schedule)['diffusers']
    assert out['timesteps'] is None and 'same integer timestep' in out['timesteps_note']
    # A continuous model (no sigma_inv) exports sigmas only.
    assert set(schedule_io.exports(t)['diffusers']) == {'sigmas'}


# ----------------------------------------------------------------------------------------------
# sample.py.

def test_list_presets_needs_no_dataset_name():
    r = run_cli('sample.py', '--list_presets')
    assert r.returncode == 0, r.stderr
    for name in presets.PRESETS:
        assert f'  {name}:' in r.stdout
    assert 'coeff=1.2' in r.stdout and 'nodes_gits.py' in r.stdout and 'AlignYourSteps' in r.stdout


def test_cli_preset_exports_and_unknown_name(tmp_path):
    out = tmp_path / 'out'
    r = run_cli('sample.py', '--dataset_name=digits', '--seeds=0-3', '--grid=True', '--t_steps=gits_sd15:coeff=1.15:steps=5',
                '--schedule_format=all', f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads((out / 'run.json').read_text())
    row = presets.GITS_SD15[1.15][3]
    assert record['t_steps'] == row and record['nfe'] == 5
    assert record['exports']['diffusers']['sigmas'] == row
    assert record['exports']['comfyui']['sigmas'] == row[:-1] + [0.0]
    assert f'ComfyUI SIGMAS: {row[:-1] + [0.0]}'.replace("'", '') in r.stdout
    assert 'set_timesteps(sigmas=[14.61464119, ' in r.stdout
    r = run_cli('sample.py', '--dataset_name=digits', '--seeds=0', '--t_steps=gits_sd14', f'--outdir={tmp_path / "x"}')
    assert_one_line_error(r, '--t_steps')
    assert 'gits_sd15, ays_sd15, ays_sdxl' in r.stderr and not (tmp_path / 'x').exists()


def test_save_schedules_file_has_exports(tmp_path):
    path = tmp_path / 'schedules.json'
    r = run_cli('sample.py', '--dataset_name=digits', '--dp=True', '--num_warmup=8', '--num_steps_tea=13',
                '--save_schedules=' + str(path), '--save_num_steps=4-6', '--sigma_min=0.02916753', '--sigma_max=14.61464119')
    assert r.returncode == 0, r.stderr
    record = json.loads(path.read_text())
    assert sorted(record['exports']) == ['4', '5', '6']
    for n, t in record['schedules'].items():
        assert record['exports'][n]['diffusers']['sigmas'] == t
        assert record['exports'][n]['comfyui']['sigmas'] == t[:-1] + [0.0]
