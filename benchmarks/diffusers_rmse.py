"""GITS on a diffusers pipeline: RMSE to a fine-step teacher at NFE 4, 5, 6, 8, 10 (for a GPU).

    python benchmarks/diffusers_rmse.py --model_path=stabilityai/stable-diffusion-xl-base-1.0 --prompt="..."
    python benchmarks/diffusers_rmse.py --model_path=black-forest-labs/FLUX.1-dev --resolution=1024

Every method takes NFE points and one network evaluation per point (the last one the final
denoising step, --denoise_to_zero=True), so NFE = points, as diffusers counts inference steps:
- pipeline_euler:   euler on the pipeline's own sigmas (model.pipeline_sigmas), from the
                    pipeline's start: diffusers' default Euler run;
- pipeline_dpmpp2m: DPM-Solver++(2M) (dpmpp max_order=2) on the same sigmas;
- pipeline_unipc:   UniPC (bh2, order 2, diffusers' default) on the same sigmas;
- gits:             --solver on gits.search_schedule's schedule (teacher --solver_tea on
                    --num_steps_tea points, from --num_warmup warm-up seeds);
- gits_refined:     --solver on student_search.search_schedule(..., refine=True).
The searched schedules span the model's whole range, so they start where the teacher starts: at
sigma_max (flow models: t = 1, x_t = the noise; VP models: x = noise * sigma_max). The pipeline
runs start where the pipeline starts (with SD/SDXL's 'leading' spacing that is a smaller sigma,
sqrt(sigma_0^2 + 1) times the noise: a bias of diffusers' default run, counted in its error).
Teacher: --teacher_solver on --teacher_steps logSNR points over the model's range, + the final
denoising step. Error: per-seed RMSE of the final latents to the teacher's, mean over
--num_eval held-out seeds (the sampling seeds 0.., disjoint from the warm-up seeds), with the
paired standard error of each method's difference to gits. Prints a table; --out writes JSON.
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib                      # noqa: E402
import gits                        # noqa: E402
import models                      # noqa: E402
import solver_utils                # noqa: E402
import solvers                     # noqa: E402
import student_search              # noqa: E402
from torch_utils import misc       # noqa: E402
from torch_utils.seeds import draw_seed_inputs   # noqa: E402
from analytic import paired         # noqa: E402

PIPELINE_METHODS = {'pipeline_euler': ('euler', {}),
                    'pipeline_dpmpp2m': ('dpmpp', dict(max_order=2, lower_order_final=False)),
                    'pipeline_unipc': ('unipc', dict(max_order=2, variant='bh2'))}
SEARCHED = ('gits', 'gits_refined')


def start_scale(model, sigma):
    """The noise factor of a run that starts at `sigma`: flow models start at x_t = noise
    (x = noise * (1 + sigma)); the others at x = noise * sigma."""
    return 1.0 + sigma if getattr(model, 'flow_matching', False) else sigma


def run(model, denoise, noise, t_steps, solver, options, scale=None):
    x = noise * (start_scale(model, float(t_steps[0])) if scale is None else scale)
    with torch.no_grad():
        return solvers.SOLVERS[solver](denoise, x, t_steps, denoise_to_zero=True, **options)


def per_seed_rmse(x, ref):
    return (x - ref).reshape(len(x), -1).double().square().mean(-1).sqrt()


def searches(model, denoise, opts):
    """{(method, nfe): t_steps} of the two searches, on seeded warm-up noise."""
    warm = draw_seed_inputs(range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup), model.shape, 0)[0]
    warm = warm.to(device=model.device, dtype=torch.float32)
    common = dict(sigma_min=model.sigma_min, sigma_max=model.sigma_max, schedule_type='logsnr',
                  num_steps_tea=opts.num_steps_tea, solver_tea=opts.solver_tea, solver=opts.solver,
                  denoise_to_zero=True)
    found = {}
    for nfe in opts.nfe_list:
        found['gits', nfe] = gits.search_schedule(denoise, warm, num_steps=nfe, **common)
        if opts.refine:
            found['gits_refined', nfe] = student_search.search_schedule(denoise, warm, num_steps=nfe, refine=True,
                                                                        **common)
    return found


def evaluate(model, opts):
    denoise = model.prompt_denoiser(opts.prompt)
    found = searches(model, denoise, opts)
    noise = draw_seed_inputs(range(opts.num_eval), model.shape, 0)[0].to(device=model.device, dtype=torch.float32)
    teacher_steps = solver_utils.get_schedule(opts.teacher_steps, model.sigma_min, model.sigma_max, 'logsnr')
    ref = run(model, denoise, noise, teacher_steps, opts.teacher_solver, {})
    rows = {}
    for nfe in opts.nfe_list:
        errors, schedules = {}, {}
        for name, (solver, options) in PIPELINE_METHODS.items():
            t_steps = model.pipeline_sigmas(nfe)
            assert solvers.count_nfe(solver, len(t_steps), denoise_to_zero=True, **options) == nfe
            errors[name] = per_seed_rmse(run(model, denoise, noise, t_steps, solver, options,
                                             scale=model.pipeline_noise_scale(nfe)), ref)
            schedules[name] = t_steps
        for name in SEARCHED:
            if (name, nfe) in found:
                t_steps = found[name, nfe]
                assert solvers.count_nfe(opts.solver, len(t_steps), denoise_to_zero=True) == nfe
                errors[name] = per_seed_rmse(run(model, denoise, noise, t_steps, opts.solver, {}), ref)
                schedules[name] = t_steps
        rows[nfe] = dict(schedules={k: solver_utils.format_t_steps(v) for k, v in schedules.items()},
                         rmse={k: dict(mean=float(e.mean()), **paired(e, errors['gits'])) for k, e in errors.items()})
        print(f'NFE {nfe}: ' + ' '.join(f'{k} {v["mean"]:.4f}' for k, v in rows[nfe]['rmse'].items()), flush=True)
    return rows


def table(rows, model_path):
    methods = list(PIPELINE_METHODS) + list(SEARCHED)
    lines = [f'RMSE of the final latents to the teacher ({model_path}); mean over held-out seeds, in brackets the '
             'difference to gits +- paired standard error', '',
             '| NFE | ' + ' | '.join(methods) + ' |', '|---|' + '---|' * len(methods)]
    for nfe, row in rows.items():
        cells = []
        for k in methods:
            c = row['rmse'].get(k)
            cells.append('-' if c is None else f'{c["mean"]:.4f}' if k == 'gits'
                         else f'{c["mean"]:.4f} ({c["diff"]:+.4f} +- {c["se"]:.4f})')
        lines.append(f'| {nfe} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


@click.command()
@click.option('--model_path', required=True, help='diffusers pipeline folder or hub id')
@click.option('--prompt', default='a photo of an astronaut riding a horse on the moon', show_default=True)
@click.option('--resolution', default=None, help='N or HxW [default: the pipeline\'s]')
@click.option('--dtype', default=None, help='float32, float16 or bfloat16 [default: half on CUDA]')
@click.option('--guidance_rate', type=float, default=None, help='[default: the pipeline\'s]')
@click.option('--nfe', default='4,5,6,8,10', show_default=True)
@click.option('--solver', default='ipndm', show_default=True, help='Solver on the searched schedules')
@click.option('--solver_tea', default=gits.SOLVER_TEA, show_default=True, help='GITS teacher solver')
@click.option('--num_steps_tea', type=click.IntRange(min=3), default=gits.NUM_STEPS_TEA, show_default=True)
@click.option('--num_warmup', type=click.IntRange(min=2), default=16, show_default=True, help='Warm-up seeds')
@click.option('--warmup_seed', type=int, default=gits.WARMUP_SEED, show_default=True)
@click.option('--refine', type=bool, default=True, show_default=True, help='Also the refined search')
@click.option('--num_eval', type=click.IntRange(min=2), default=16, show_default=True, help='Held-out seeds 0..')
@click.option('--teacher_solver', default='heun', show_default=True)
@click.option('--teacher_steps', type=click.IntRange(min=3), default=200, show_default=True)
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--out', default=None, help='JSON results file')
def main(model_path, prompt, resolution, dtype, guidance_rate, nfe, solver, solver_tea, num_steps_tea, num_warmup,
         warmup_seed, refine, num_eval, teacher_solver, teacher_steps, device, out):
    """GITS and its refinement against the pipeline's Euler, DPM-Solver++(2M) and UniPC."""
    opts = dnnlib.EasyDict(prompt=prompt, solver=solver, solver_tea=solver_tea, num_steps_tea=num_steps_tea,
                           num_warmup=num_warmup, warmup_seed=warmup_seed, refine=refine, num_eval=num_eval,
                           teacher_solver=teacher_solver, teacher_steps=teacher_steps,
                           nfe_list=misc.parse_int_list(nfe))
    for flag, name in (('--solver', solver), ('--solver_tea', solver_tea), ('--teacher_solver', teacher_solver)):
        if name not in solvers.SOLVERS:
            raise dnnlib.util.UserError(f'{flag}: one of {", ".join(solvers.SOLVERS)} (got "{name}")')
    if solvers.count_nfe(solver, 3, denoise_to_zero=True) != 3:
        raise dnnlib.util.UserError(f'--solver: a one-evaluation solver (euler, ipndm, ipndm_v, deis, dpmpp, unipc; '
                                    f'got "{solver}")')
    if min(opts.nfe_list) < 2:
        raise dnnlib.util.UserError('--nfe: values of at least 2')
    model = models.load('diffusers', model_path=model_path, device=device, prompt=prompt, resolution=resolution,
                        dtype=dtype, guidance_rate=guidance_rate)
    rows = evaluate(model, opts)
    text = table(rows, model_path)
    print(text)
    if out:
        record = dict(command=' '.join(sys.argv), model_path=model_path, options=dict(opts),
                      sigma_range=[model.sigma_min, model.sigma_max], rows=rows, table=text)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        misc.atomic_write_json(out, record)


if __name__ == '__main__':
    dnnlib.run_cli(main)
