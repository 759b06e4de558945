"""models/diffusers_pipeline.py on tiny random pipelines (tests/diffusers_tiny.py: SDXL, an SD 2.x
v-prediction UNet, SD3, Flux), saved with save_pretrained and loaded through model_path.

(a) euler on the pipeline schedule with denoise_to_zero gives diffusers' own Euler images;
(b) solvers.dpmpp (2M) gives diffusers' DPMSolverMultistepScheduler; (c) every solver and the GITS
search (with and without refinement) run on the wrapper; (d) a searched schedule exported by
schedule_io and handed back to the pipeline as `sigmas=` gives our Euler images; and the
loading errors are one UserError line each.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import gits
import models
import schedule_io
import schedule_presets
import solver_utils
import solvers
import student_search
from dnnlib.util import UserError
from models.diffusers_pipeline import FluxPipelineModel
from torch_utils.seeds import draw_seed_inputs

import diffusers_tiny

PROMPT = 'a photo of an astronaut riding a horse on the moon'
SEEDS = [0, 1]
IMAGE_TOL = 1 / 255          # decoded images in [0, 1], float32 on CPU
KINDS = ('sdxl', 'sd2v', 'sd3', 'flux')
FLOW = ('sd3', 'flux')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The tiny networks gain nothing from a second thread, and on a loaded machine the thread
    pool's waiting made them 20-60x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('diffusers_tiny')
    return {kind: diffusers_tiny.build(kind, root / kind) for kind in KINDS}


_MODELS = {}


def load(folders, kind, **kw):
    key = (kind, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = models.load('diffusers', model_path=folders[kind], prompt=PROMPT,
                                   resolution=diffusers_tiny.RESOLUTION, **kw)
    return _MODELS[key]


def unit_noise(model, seeds=SEEDS):
    return draw_seed_inputs(seeds, model.shape, 0)[0].float()


def pipeline_latents(model, noise):
    """The seeds' unit noise as the pipeline takes `latents` (Flux: packed 2x2)."""
    if isinstance(model, FluxPipelineModel):
        b, c, h, w = noise.shape
        return model.pipe._pack_latents(noise, b, c, h, w)
    return noise


def run_pipeline(model, noise, **kw):
    """diffusers' own run: images in [0, 1], float32 [B, 3, H, W]."""
    pipe_kw = dict(prompt=[PROMPT] * noise.shape[0], height=model.height, width=model.width,
                   guidance_scale=model.guidance_rate, latents=pipeline_latents(model, noise), output_type='pt')
    return model.pipe(**pipe_kw, **kw).images.float()


def images(model, x):
    return (model.decode(x) + 1) / 2


def ours(model, t_steps, x, solver='euler', **options):
    denoise = model.bind(**model.conditioning(SEEDS))
    return solvers.SOLVERS[solver](denoise, x, t_steps, **options)


# ----------------------------------------------------------------------------------------------
# (a) Euler equals diffusers.

@pytest.mark.parametrize('kind', KINDS)
def test_euler_on_pipeline_schedule_equals_diffusers(folders, kind):
    model = load(folders, kind)
    num_steps = 4
    noise = unit_noise(model)
    t_steps = model.pipeline_sigmas(num_steps)
    assert len(t_steps) == num_steps
    x = ours(model, t_steps, noise * model.pipeline_noise_scale(num_steps), denoise_to_zero=True)
    reference = run_pipeline(model, noise, num_inference_steps=num_steps)
    assert (images(model, x) - reference).abs().max() <= IMAGE_TOL
    # The images differ more than that between step counts, so the comparison can fail.
    other = ours(model, model.pipeline_sigmas(num_steps + 2),
                 noise * model.pipeline_noise_scale(num_steps + 2), denoise_to_zero=True)
    assert (images(model, other) - reference).abs().max() > 2 * IMAGE_TOL


def test_pipeline_start_follows_init_noise_sigma(folders):
    """SDXL's 'leading' spacing starts the pipeline at sqrt(sigma_0^2 + 1), SD 2.x's 'linspace' at
    sigma_0, flow pipelines at the noise itself (x_t = noise: x = noise * (1 + sigma_0))."""
    sdxl, sd2v, flux = load(folders, 'sdxl'), load(folders, 'sd2v'), load(folders, 'flux')
    s0 = float(sdxl.pipeline_sigmas(4)[0])
    assert sdxl.pipeline_noise_scale(4) == pytest.approx((s0 ** 2 + 1) ** 0.5, rel=1e-6)
    assert sd2v.pipeline_noise_scale(4) == pytest.approx(float(sd2v.pipeline_sigmas(4)[0]), rel=1e-6)
    assert flux.pipeline_sigmas(4)[0] == flux.sigma_max
    assert flux.pipeline_noise_scale(4) == 1 + flux.sigma_max


def test_flux_non_square_resolution_equals_diffusers(folders):
    model = models.load('diffusers', model_path=folders['flux'], prompt=PROMPT, resolution='32x48')
    assert model.shape == (4, 16, 24)
    noise = unit_noise(model, [3])
    x = solvers.SOLVERS['euler'](model.bind(**model.conditioning([3])), noise * model.pipeline_noise_scale(3),
                                 model.pipeline_sigmas(3), denoise_to_zero=True)
    reference = run_pipeline(model, noise, num_inference_steps=3)
    assert (images(model, x) - reference).abs().max() <= IMAGE_TOL


# ----------------------------------------------------------------------------------------------
# The flow start (t = 1, sigma = infinity) and the shift.

@pytest.mark.parametrize('kind', FLOW)
def test_flow_first_step_matches_infinity(folders, kind):
    """The stand-in sigma_max = 1e4: the network is evaluated at t = 1 exactly, and the first
    Euler step is the exact step from infinity, x_t1 = t1 * noise + (1 - t1) * D(noise; inf), to
    float32 cancellation (measured 5e-4; 1e2 would give 1.5e-2, 1e6 5e-2)."""
    model = load(folders, kind)
    noise = unit_noise(model)
    cond = model.conditioning(SEEDS)
    S = model.sigma_max
    D_inf = model.denoise(noise, float('inf'), **cond)
    # x_t = noise (to the rounding of noise * (1 + S) / (1 + S)) and t = 1 exactly.
    torch.testing.assert_close(model.denoise(noise * (1 + S), S, **cond), D_inf, rtol=0, atol=1e-5)
    t_steps = model.pipeline_sigmas(4)
    s1 = float(t_steps[1])
    t1 = s1 / (1 + s1)
    exact = t1 * noise.double() + (1 - t1) * D_inf.double()
    x1 = ours(model, t_steps[:2], noise * model.pipeline_noise_scale(4))
    err = (x1.double() / (1 + s1) - exact).abs().max()
    assert err < 1e-3
    # A smaller stand-in is measurably worse: the check can tell.
    small = t_steps[:2].clone()
    small[0] = 100.0
    x1_small = ours(model, small, noise * 101.0)
    assert (x1_small.double() / (1 + s1) - exact).abs().max() > 5 * err


@pytest.mark.parametrize('kind', FLOW)
def test_shift_multiplies_edm_sigma(folders, kind):
    """The scheduler's own shift of given times (SD3's static 3, Flux's dynamic exp(mu) at this
    resolution) is model.shift times their EDM sigma."""
    import copy
    model = load(folders, kind)
    scheduler = copy.deepcopy(model.scheduler)
    times = np.linspace(0.95, 0.05, 7)
    kw = {'mu': model.mu()} if scheduler.config.use_dynamic_shifting else {}
    scheduler.set_timesteps(sigmas=times, **kw)
    shifted = scheduler.sigmas[:-1].double()
    assert model.shift != pytest.approx(1.0, abs=0.1)
    unshifted = torch.tensor(times / (1 - times), dtype=torch.float64)
    torch.testing.assert_close(shifted / (1 - shifted), model.shift * unshifted, rtol=2e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# (b) DPM-Solver++(2M) equals diffusers.

@pytest.mark.parametrize('kind', ('sdxl', 'sd2v'))
def test_dpmpp_equals_diffusers_pipeline(folders, kind):
    """The pipeline with DPMSolverMultistepScheduler (2M, data prediction, final step to 0): our
    dpmpp max_order=2 on its sigmas, the final first-order step to 0 being denoise_to_zero. The
    scheduler works on VP samples (init_noise_sigma 1): our start is noise * sqrt(sigma_0^2 + 1)."""
    from diffusers import DPMSolverMultistepScheduler
    model = load(folders, kind)
    num_steps = 5
    scheduler = DPMSolverMultistepScheduler.from_config(model.pipe.scheduler.config, solver_order=2,
                                                        algorithm_type='dpmsolver++')
    probe = DPMSolverMultistepScheduler.from_config(scheduler.config)
    probe.set_timesteps(num_steps)
    t_steps = probe.sigmas[:-1].double()
    noise = unit_noise(model)
    x = ours(model, t_steps, noise * float((t_steps[0] ** 2 + 1) ** 0.5), solver='dpmpp', max_order=2,
             lower_order_final=False, denoise_to_zero=True)
    original = model.pipe.scheduler
    model.pipe.scheduler = scheduler
    try:
        reference = run_pipeline(model, noise, num_inference_steps=num_steps)
    finally:
        model.pipe.scheduler = original
    assert (images(model, x) - reference).abs().max() <= IMAGE_TOL
    euler = ours(model, t_steps, noise * float((t_steps[0] ** 2 + 1) ** 0.5), denoise_to_zero=True)
    assert (images(model, euler) - reference).abs().max() > 2 * IMAGE_TOL


@pytest.mark.parametrize('kind', FLOW)
def test_dpmpp_equals_diffusers_flow_sigmas(folders, kind):
    """DPMSolverMultistepScheduler with use_flow_sigmas / flow_shift = the model's shift, stepped on
    the velocity our wrapper gives at its sigmas (the pipelines would pass its integer
    timesteps to the network, not its sigmas), against our dpmpp max_order=2 on the same sigmas."""
    from diffusers import DPMSolverMultistepScheduler
    model = load(folders, kind)
    num_steps = 6
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=model.shift,
                                            prediction_type='flow_prediction', solver_order=2)
    scheduler.set_timesteps(num_steps)
    flow_t = scheduler.sigmas.double()
    assert flow_t[-1] == 0 and flow_t[0] < 1
    t_steps = flow_t[:-1] / (1 - flow_t[:-1])
    noise = unit_noise(model)
    cond = model.conditioning(SEEDS)
    x_t = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        s = float(t_steps[i])
        D = model.denoise(x_t * (1 + s), s, **cond)
        v = (x_t - D) / (s / (1 + s))
        x_t = scheduler.step(v, timestep, x_t, return_dict=False)[0]
    x = ours(model, t_steps, noise * (1 + float(t_steps[0])), solver='dpmpp', max_order=2,
             lower_order_final=False, denoise_to_zero=True)
    torch.testing.assert_close(x, x_t, rtol=0, atol=2e-4)
    assert (images(model, x) - images(model, x_t)).abs().max() <= IMAGE_TOL
    first_order = ours(model, t_steps, noise * (1 + float(t_steps[0])), solver='dpmpp', max_order=1,
                       denoise_to_zero=True)
    assert (first_order - x_t).abs().max() > 10 * 2e-4


# ----------------------------------------------------------------------------------------------
# (c) Every solver and the GITS search run on the wrapper.

@pytest.mark.parametrize('kind', ('flux', pytest.param('sd2v', marks=pytest.mark.slow)))
def test_every_solver_runs_and_converges(folders, kind):
    """Every solver, on logSNR schedules over the model's whole range (from the flow stand-in for
    infinity), gets nearer a 120-point Heun teacher when the steps are halved: measured on flux,
    errors 0.007-0.045 at 12 points, 0.45-0.75 times that at 24."""
    model = load(folders, kind)
    noise = unit_noise(model)
    grid = lambda n: solver_utils.get_schedule(n, model.sigma_min, model.sigma_max, schedule_type='logsnr')
    x0 = noise * model.sigma_max
    teacher = ours(model, grid(120), x0, solver='heun')
    for name in solvers.SOLVERS:
        coarse, fine = (ours(model, grid(n), x0, solver=name) for n in (12, 24))
        assert torch.isfinite(coarse).all() and torch.isfinite(fine).all(), name
        err_coarse, err_fine = ((x - teacher).pow(2).mean().sqrt() for x in (coarse, fine))
        assert err_fine < 0.8 * err_coarse, (name, float(err_coarse), float(err_fine))


@pytest.fixture(scope='module')
def searched(folders):
    """GITS schedules (5 points) found on each model's one-prompt denoiser, cached per model."""
    found = {}

    def search(kind):
        if kind not in found:
            model = load(folders, kind)
            latents = torch.randn([4, *model.shape], generator=torch.Generator().manual_seed(123))
            found[kind] = gits.search_schedule(model.prompt_denoiser(), latents, num_steps=5,
                                               sigma_min=model.sigma_min, sigma_max=model.sigma_max,
                                               num_steps_tea=21, schedule_type='logsnr')
        return found[kind]
    return search


def check_schedule(model, t_steps, num_steps):
    assert len(t_steps) == num_steps and t_steps.dtype == torch.float64
    assert (t_steps[1:] < t_steps[:-1]).all()
    assert float(t_steps[0]) == pytest.approx(model.sigma_max) and float(t_steps[-1]) == pytest.approx(model.sigma_min)


@pytest.mark.parametrize('kind', ('flux', pytest.param('sdxl', marks=pytest.mark.slow)))
def test_gits_search_runs(folders, searched, kind):
    model = load(folders, kind)
    t_steps = searched(kind)
    check_schedule(model, t_steps, 5)
    grid = solver_utils.get_schedule(21, model.sigma_min, model.sigma_max, schedule_type='logsnr')
    assert all(any(abs(float(t) - float(g)) <= 1e-9 * float(g) for g in grid) for t in t_steps)   # on the teacher grid


@pytest.mark.slow
def test_refined_search_runs(folders):
    model = load(folders, 'flux')
    latents = torch.randn([6, *model.shape], generator=torch.Generator().manual_seed(7))
    t_steps = student_search.search_schedule(model.prompt_denoiser(), latents, num_steps=5, sigma_min=model.sigma_min,
                                             sigma_max=model.sigma_max, num_steps_tea=21, schedule_type='logsnr',
                                             refine=True)
    check_schedule(model, t_steps, 5)


def test_flux_preset_is_comfyui_table(folders):
    """optimal_steps_flux is ComfyUI's FLUX table in flow time; it runs on the Flux wrapper."""
    model = load(folders, 'flux')
    t_steps = torch.tensor(schedule_presets.preset_t_steps('optimal_steps_flux'), dtype=torch.float64)
    times = schedule_io.flow_times(t_steps, model.sigma_max)
    assert times == pytest.approx(schedule_presets.OPTIMAL_STEPS_FLUX, rel=1e-12)
    assert schedule_io.exports(t_steps, model)['comfyui']['sigmas'][-1] == 0.0
    x = ours(model, t_steps, unit_noise(model) * float(t_steps[0]), denoise_to_zero=True)
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------
# (d) Export round trip.

@pytest.mark.parametrize('kind', ('flux', 'sd3', 'sd2v', pytest.param('sdxl', marks=pytest.mark.slow)))
def test_exported_schedule_reproduces_our_euler_in_the_pipeline(folders, searched, kind):
    """Flow: the exported sigmas= (shift taken out, t = 1 first) run by the pipeline = our euler
    with denoise_to_zero from sample.py's start x = noise * t_steps[0]. SD: EulerDiscreteScheduler's
    sigmas= (our run, no final step); SDXL's 'leading' spacing takes latents pre-scaled to our start
    (schedule_io's module doc)."""
    model = load(folders, kind)
    t_steps = searched(kind)
    exported = schedule_io.exports(t_steps, model)['diffusers']['sigmas']
    noise = unit_noise(model)
    flow = getattr(model, 'flow_matching', False)
    if flow:
        assert exported[0] == 1.0 and exported[-1] > 0
        torch.testing.assert_close(schedule_io.from_flow_sigmas(exported, model.shift, model.sigma_max), t_steps,
                                   rtol=1e-12, atol=0)
        lines = schedule_io.format_lines(t_steps, model, 'all')
        assert lines[0].startswith('diffusers: pipe(..., sigmas=[1.0, ') and lines[-1].endswith(', 0.0]')
        latents = noise
    else:
        assert exported == [float(v) for v in t_steps]
        s0 = float(t_steps[0])
        model.pipe.scheduler.set_timesteps(sigmas=exported)
        latents = noise * s0 / float(model.pipe.scheduler.init_noise_sigma)
    x = ours(model, t_steps, noise * float(t_steps[0]), denoise_to_zero=flow)
    reference = run_pipeline(model, latents, sigmas=exported)
    assert (images(model, x) - reference).abs().max() <= IMAGE_TOL
    default = run_pipeline(model, latents, num_inference_steps=len(t_steps))
    assert (default - reference).abs().max() > 2 * IMAGE_TOL


# ----------------------------------------------------------------------------------------------
# Bad input: one UserError line each.

def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert '\n' not in message
    for word in words:
        assert word in message, (word, message)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path=str(tmp_path), prompt=PROMPT)
    one_line_error(e, '--model_path', 'model_index.json')


def test_unsupported_pipeline_class(folders, tmp_path):
    folder = tmp_path / 'other'
    folder.mkdir()
    (folder / 'model_index.json').write_text(json.dumps({'_class_name': 'KandinskyPipeline', 'unet': ['diffusers', 'UNet2DConditionModel']}))
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path=str(folder), prompt=PROMPT)
    one_line_error(e, '--model_path', 'KandinskyPipeline', 'StableDiffusionXLPipeline', 'FluxPipeline')


def test_missing_component(folders, tmp_path):
    folder = tmp_path / 'sd2v'
    shutil.copytree(folders['sd2v'], folder)
    shutil.rmtree(folder / 'vae')
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path=str(folder), prompt=PROMPT)
    one_line_error(e, '--model_path', 'vae')


def test_negative_prompt_where_the_model_takes_none(folders):
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path=folders['flux'], prompt=PROMPT, negative_prompt='blurry')
    one_line_error(e, '--negative_prompt', 'FluxPipeline')


def test_negative_prompt_changes_guided_images(folders):
    plain = load(folders, 'sd3')
    negative = load(folders, 'sd3', negative_prompt='a red tree')
    x = unit_noise(plain) * plain.sigma_max
    assert not torch.allclose(plain.denoise(x, 5.0, **plain.conditioning(SEEDS)),
                              negative.denoise(x, 5.0, **negative.conditioning(SEEDS)))


def test_no_diffusers_installed(monkeypatch, folders):
    monkeypatch.setitem(sys.modules, 'diffusers', None)     # `import diffusers` now raises ImportError
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path=folders['flux'], prompt=PROMPT)
    one_line_error(e, '--dataset_name=diffusers', 'pip install diffusers transformers')


def test_project_imports_without_diffusers():
    import subprocess
    code = ('import sys; sys.modules["diffusers"] = None; sys.modules["transformers"] = None\n'
            'import models, models.diffusers_pipeline, schedule_io, schedule_presets, sample\n'
            'from dnnlib.util import UserError\n'
            'try:\n    models.load("diffusers", model_path="x", prompt="a")\n'
            'except UserError as e:\n    print(e)\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ('--dataset_name=diffusers needs the diffusers and transformers packages: '
                                'pip install diffusers transformers')


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path='nobody-here/not-a-cached-pipeline', prompt=PROMPT)
    one_line_error(e, '--model_path', 'nobody-here/not-a-cached-pipeline', 'offline')


@pytest.mark.parametrize('kw, flag', [
    (dict(dtype='float64'), '--dtype'),
    (dict(resolution='33'), '--resolution'),
    (dict(resolution='32xx'), '--resolution'),
    (dict(guidance_rate=float('nan')), '--guidance_rate'),
    (dict(use_fp16=True), '--use_fp16'),
])
def test_bad_options(folders, kw, flag):
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path=folders['sd3'], prompt=PROMPT, **kw)
    one_line_error(e, flag)


def test_prompt_rules(folders, tmp_path):
    with pytest.raises(UserError) as e:
        models.load('diffusers', model_path=folders['sd3'])
    one_line_error(e, '--prompt')
    path = tmp_path / 'prompts.txt'
    path.write_text('a cat\na dog\n')
    model = models.load('diffusers', model_path=folders['sd3'], prompt_file=str(path), resolution=32)
    assert model.image_info(1) == {'prompt': 'a dog'}
    with pytest.raises(UserError):
        model.check_seeds([0, 2])


# ----------------------------------------------------------------------------------------------
# benchmarks/diffusers_rmse.py (its real runs need a GPU and real weights).

@pytest.mark.slow
def test_rmse_benchmark_smoke(folders, tmp_path):
    from helpers import run_cli
    out = tmp_path / 'rmse.json'
    r = run_cli('benchmarks/diffusers_rmse.py', f'--model_path={folders["flux"]}', '--resolution=32', '--nfe=4,5',
                '--num_warmup=4', '--num_eval=2', '--num_steps_tea=11', '--teacher_steps=20', '--device=cpu',
                f'--out={out}')
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())['rows']
    for nfe in ('4', '5'):
        rmse = rows[nfe]['rmse']
        assert set(rmse) == {'pipeline_euler', 'pipeline_dpmpp2m', 'pipeline_unipc', 'gits', 'gits_refined'}
        assert all(v['mean'] > 0 and np.isfinite(v['mean']) for v in rmse.values())
        assert rmse['gits']['diff'] == 0
        assert len(json.loads(rows[nfe]['schedules']['gits'])) == int(nfe)
    assert rows['5']['rmse']['pipeline_euler']['mean'] < rows['4']['rmse']['pipeline_euler']['mean']


def test_half_precision_denoiser(folders):
    """--dtype=bfloat16 runs the network (and text encoders) in bfloat16; the denoiser still
    takes and returns float32, near the float32 one (bfloat16 keeps 8 bits)."""
    full = load(folders, 'flux')
    half = load(folders, 'flux', dtype='bfloat16')
    assert half.use_fp16 and next(half.network.parameters()).dtype == torch.bfloat16
    x = unit_noise(full) * 3.0
    D_full = full.denoise(x, 3.0, **full.conditioning(SEEDS))
    D_half = half.denoise(x, 3.0, **half.conditioning(SEEDS))
    assert D_half.dtype == torch.float32
    scale = D_full.abs().max()
    assert 0 < (D_half - D_full).abs().max() < 0.05 * scale


# ----------------------------------------------------------------------------------------------
# The command line: sample.py --dataset_name=diffusers.

def cli_args(folders, kind, *extra):
    return ['--dataset_name=diffusers', f'--model_path={folders[kind]}', f'--prompt={PROMPT}',
            f'--resolution={diffusers_tiny.RESOLUTION}', '--seeds=0-1', '--batch=2', *extra]


@pytest.mark.parametrize('kind', ('sdxl', 'flux'))
def test_cli_euler_pipeline_mode_equals_diffusers(folders, kind, tmp_path):
    """The README's command: euler + --schedule_type=pipeline + --denoise_to_zero writes the PNGs of
    diffusers' own N-step run (starting where the pipeline starts), and run.json records the start."""
    import json
    from PIL import Image
    import sample
    from helpers import run_here
    num_steps = 4
    out = tmp_path / 'out'
    r = run_here(sample.main, *cli_args(folders, kind, '--solver=euler', '--schedule_type=pipeline',
                                        f'--num_steps={num_steps}', '--denoise_to_zero=True', f'--outdir={out}'))
    assert r.returncode == 0, r.stderr
    model = load(folders, kind)
    reference = run_pipeline(model, unit_noise(model), num_inference_steps=num_steps)
    for i, seed in enumerate(SEEDS):
        png = np.asarray(Image.open(out / f'{seed:06d}.png'), dtype=np.float64) / 255
        assert np.abs(png - reference[i].permute(1, 2, 0).numpy()).max() <= 1.5 / 255   # PNG rounding + 1/255
    record = json.loads((out / 'run.json').read_text())
    scale = model.pipeline_noise_scale(num_steps)
    assert record['start_scale'] == (None if scale == record['t_steps'][0] else scale)
    assert record['resolution'] == [model.height, model.width] and record['dtype'] == 'float32'


def test_cli_pipeline_flags_refused_elsewhere(folders, tmp_path):
    import sample
    from helpers import assert_one_line_error, run_here
    for args, flag in ((['--dataset_name=digits', '--schedule_type=pipeline'], '--schedule_type'),
                       (['--dataset_name=digits', '--negative_prompt=x'], '--negative_prompt'),
                       (['--dataset_name=digits', '--dtype=float16'], '--dtype'),
                       (['--dataset_name=digits', '--dtype=float8'], '--dtype'),
                       (cli_args(folders, 'flux', '--schedule_type=pipeline', '--dp=True'), '--dp'),
                       (cli_args(folders, 'flux', '--schedule_type=pipeline', '--schedule_rho=3'), '--schedule_rho')):
        r = run_here(sample.main, '--seeds=0', f'--outdir={tmp_path / "x"}', *args)
        assert_one_line_error(r, flag)
        assert not (tmp_path / 'x').exists()


@pytest.mark.slow
def test_cli_search_and_refinement_write_run_json(folders, tmp_path):
    """--dp with --refine through sample.py on a flow model: the search runs on the pipeline's
    denoiser, and run.json records the searched schedule and its exports in flow time."""
    import json
    import sample
    from helpers import run_here
    out = tmp_path / 'out'
    r = run_here(sample.main, *cli_args(folders, 'flux', '--solver=dpmpp', '--num_steps=4', '--dp=True', '--refine=True',
                                        '--num_warmup=4', '--num_steps_tea=9', f'--outdir={out}'))
    assert r.returncode == 0, r.stderr
    record = json.loads((out / 'run.json').read_text())
    assert record['search']['evals']['refine'] > 0 and len(record['t_steps']) == 4
    assert record['exports']['diffusers']['sigmas'][0] == 1.0          # flow time, t = 1 first
    assert sorted(p.name for p in out.glob('*.png')) == ['000000.png', '000001.png']
