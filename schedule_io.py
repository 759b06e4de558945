"""A schedule (`t_steps`: N + 1 noise levels, N steps) in the forms diffusers and ComfyUI take.

For Stable Diffusion our EDM noise level is diffusers' and ComfyUI's sigma,
sqrt((1 - alpha_bar) / alpha_bar), so the numbers carry over unchanged; only the conventions for
the end of the list differ. Checked against diffusers 0.42.1's schedulers:

- diffusers `sigmas`: the list itself. EulerDiscreteScheduler.set_timesteps(sigmas=...) (and so
  StableDiffusionPipeline(..., sigmas=...) with that scheduler) runs len(sigmas) - 1 steps and
  stops at the last value, exactly our run. In 0.42.1 the SD-capable schedulers that take
  `sigmas` are EulerDiscreteScheduler (and EDMEulerScheduler for EDM-style models, which appends
  its own final sigma, 0 by default: our run plus one denoising step, i.e. --denoise_to_zero).
  UniPCMultistepScheduler takes `sigmas` only for flow-matching models; DPMSolverMultistepScheduler
  takes none.
- diffusers `timesteps` (discrete-time models only): the integer timesteps of the first N points.
  DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler and EulerDiscreteScheduler take
  `timesteps=`, run one step from each and append their own final sigma: with
  final_sigmas_type="sigma_min" that is sigma(t=0), SD's sigma_min and the end of every default
  or preset schedule here (so the run is ours up to the rounding); with "zero" (their default)
  the last step denoises fully, as ComfyUI does. HeunDiscreteScheduler always appends 0. A point's
  fractional timestep is the model's own `sigma_inv` (log-sigma interpolated between integer
  timesteps, as diffusers' _sigma_to_t does); the integers are those rounded to the nearest
  (ties to even), and `timesteps_sigmas` says which sigmas they stand for. When two points round
  to one timestep, there is no integer form (`timesteps` is null, with a note).
- SDXL and other SD schedulers with timestep_spacing="leading": set_timesteps(sigmas=...) makes the
  scheduler's init_noise_sigma sqrt(sigma_0^2 + 1), so the pipeline starts from
  noise * sqrt(sigma_0^2 + 1) where we start from noise * sigma_0; to run our schedule from our
  start, pass it `latents = noise * sigma_0 / sqrt(sigma_0^2 + 1)`.
- ComfyUI `SIGMAS`: the list with its last value replaced by 0. That is what ComfyUI's own
  GITSScheduler and AlignYourStepsScheduler do with their published tables (which end at SD's
  sigma_min, like our schedules), so the step count and NFE stay the same and our presets export
  to exactly the lists those nodes give. ComfyUI's last step then goes to 0 (a full denoising
  step, x = D(x; t_{N-1}) for Euler) instead of to t_N; feed the plain `sigmas` list to ComfyUI
  to run our schedule unchanged.

Flow-matching models (models/diffusers_pipeline.py: SD3, Flux; `model.flow_matching`): our sigma is
t / (1 - t) of the flow time t, and the wrapper's sigma_max stands for t = 1 (infinity).
- diffusers `sigmas` (StableDiffusion3Pipeline / FluxPipeline(..., sigmas=...), i.e.
  FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=...)): the pipeline applies its
  shift (static, or dynamic from mu) to what it is given and appends 0 itself, so the list is the
  flow times of the points with the shift taken out (EDM sigma / shift, `model.shift`), no final
  0. The pipeline then runs len(sigmas) steps, the last one to t = 0: our euler run with
  --denoise_to_zero=True. (Schedulers with shift_terminal or karras/exponential/beta sigmas
  transform a given list further; the form assumes plain ones, as SD3 and Flux ship.)
- ComfyUI `SIGMAS`: the flow times themselves (shift included: ComfyUI's sampling sigmas are the
  times the model is evaluated at), with 0 appended, the same run.
"""

import math

import torch

import schedules

FORMATS = ('t_steps', 'diffusers', 'comfyui', 'all')


def _floats(t_steps):
    return [float(v) for v in t_steps]


def diffusers_sigmas(t_steps):
    """The `sigmas=` list for EulerDiscreteScheduler.set_timesteps / the SD pipelines."""
    return _floats(t_steps)


def from_diffusers_sigmas(sigmas):
    """t_steps (float64) from a diffusers `sigmas` list. A final 0, which diffusers appends to its
    own schedules (final_sigmas_type="zero"), is dropped: our solvers end at a positive noise
    level (--denoise_to_zero=True adds the final denoising step)."""
    values = _floats(sigmas)
    if len(values) > 2 and values[-1] == 0:
        values = values[:-1]
    return torch.tensor(schedules.check_t_steps(values), dtype=torch.float64)


def comfyui_sigmas(t_steps):
    """ComfyUI's SIGMAS: the schedule with its last value replaced by 0 (see the module doc)."""
    return _floats(t_steps)[:-1] + [0.0]


def from_comfyui_sigmas(sigmas, sigma_min):
    """t_steps from a ComfyUI SIGMAS list ending in 0: the 0 becomes `sigma_min` (the model's
    smallest noise level, where ComfyUI's tables and our schedules end)."""
    values = _floats(sigmas)
    if not values or values[-1] != 0:
        raise ValueError('a ComfyUI SIGMAS list ends in 0')
    return torch.tensor(schedules.check_t_steps(values[:-1] + [float(sigma_min)]), dtype=torch.float64)


def diffusers_timesteps(t_steps, model):
    """{timesteps, timesteps_sigmas, timesteps_exact} for a discrete-time model (see the module doc)."""
    exact = torch.as_tensor(model.sigma_inv(torch.as_tensor(_floats(t_steps), dtype=torch.float64)))
    rounded = [int(v) for v in torch.round(exact[:-1])]
    out = dict(timesteps_exact=_floats(exact))
    if any(b >= a for a, b in zip(rounded, rounded[1:])):
        return dict(out, timesteps=None, timesteps_note='two points round to the same integer timestep')
    return dict(out, timesteps=rounded, timesteps_sigmas=_floats(model.sigma(torch.tensor(rounded))))


def flow_times(t_steps, sigma_max):
    """Flow time t = sigma / (1 + sigma) of each point; sigma_max (the stand-in for infinity) is t = 1."""
    return [1.0 if v >= sigma_max else v / (1 + v) for v in _floats(t_steps)]


def flow_sigmas(t_steps, shift, sigma_max):
    """The `sigmas=` list of a flow pipeline: the flow times with the scheduler's shift taken out."""
    return [1.0 if v >= sigma_max else (v / shift) / (1 + v / shift) for v in _floats(t_steps)]


def from_flow_sigmas(sigmas, shift, sigma_max):
    """t_steps from a flow pipeline's `sigmas=` list (inverse of flow_sigmas; t = 1 is sigma_max)."""
    values = [float(sigma_max) if u >= 1 else shift * u / (1 - u) for u in _floats(sigmas)]
    return torch.tensor(schedules.check_t_steps(values), dtype=torch.float64)


def flow_exports(t_steps, model):
    return dict(diffusers=dict(sigmas=flow_sigmas(t_steps, model.shift, model.sigma_max)),
                comfyui=dict(sigmas=flow_times(t_steps, model.sigma_max) + [0.0]))


def exports(t_steps, model=None):
    """Every form of one schedule, for run.json and --save_schedules files."""
    if getattr(model, 'flow_matching', False):
        return flow_exports(t_steps, model)
    diffusers = dict(sigmas=diffusers_sigmas(t_steps))
    if model is not None and hasattr(model, 'sigma_inv') and hasattr(model, 'sigma'):
        diffusers.update(diffusers_timesteps(t_steps, model))
    return dict(diffusers=diffusers, comfyui=dict(sigmas=comfyui_sigmas(t_steps)))


def _text(values):
    return '[' + ', '.join(repr(v) if isinstance(v, int) or math.isfinite(v) else str(v) for v in values) + ']'


def format_lines(t_steps, model=None, fmt='t_steps'):
    """Extra printed lines for --schedule_format (the --t_steps form is always printed)."""
    if fmt not in FORMATS:
        raise ValueError(f'--schedule_format: one of {", ".join(FORMATS)} (got "{fmt}")')
    forms = exports(t_steps, model)
    lines = []
    if fmt in ('diffusers', 'all'):
        d = forms['diffusers']
        if getattr(model, 'flow_matching', False):
            lines.append(f'diffusers: pipe(..., sigmas={_text(d["sigmas"])})  # flow pipeline: it applies its '
                         'shift and appends 0 (= --denoise_to_zero=True)')
        else:
            lines.append(f'diffusers: scheduler.set_timesteps(sigmas={_text(d["sigmas"])})  # EulerDiscreteScheduler')
        if d.get('timesteps') is not None:
            lines.append(f'diffusers: scheduler.set_timesteps(timesteps={_text(d["timesteps"])})  '
                         '# e.g. DPMSolverMultistepScheduler, final_sigmas_type="sigma_min"')
    if fmt in ('comfyui', 'all'):
        lines.append(f'ComfyUI SIGMAS: {_text(forms["comfyui"]["sigmas"])}')
    return lines
