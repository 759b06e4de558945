"""Sample a pretrained diffusion model with a fast ODE solver, optionally on a GITS schedule.

    python sample.py --dataset_name=digits --seeds=0-63 --grid=True
    torchrun --standalone --nproc_per_node=2 sample.py --dataset_name=gmm --seeds=0-999

Every image is a pure function of its seed (noise and class label are drawn from a generator
seeded by the seed alone), so batch size, process count and interruptions do not change it.
"""

import concurrent.futures
import dataclasses
import math
import os
import sys

import click
import numpy as np
import torch
from PIL import Image

import dnnlib
import gits
import models
import options
import run_record
import run_schedule
import schedule_io
import schedule_presets
import schedules
import solvers
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.seeds import drawn_ahead, seed_batch, split_batches

SOLVER_NAMES = ('euler', 'ipndm', 'ipndm_v', 'heun', 'dpm', 'dpmpp', 'deis', 'unipc')   # in the order of --help
BOOL = click.BOOL


# ----------------------------------------------------------------------------------------------
# Images.

def to_uint8(images):
    """[-1, 1] float NCHW -> uint8 NHWC numpy (EDM's rounding)."""
    return (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(array):
    import io
    img = Image.fromarray(array[:, :, 0], 'L') if array.shape[2] == 1 else Image.fromarray(array, 'RGB')
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def make_grid(arrays, min_tile=32):
    """Square-ish grid of HWC uint8 images. Tiles smaller than `min_tile` pixels (8x8 digits) are
    enlarged by an integer factor (nearest neighbour) and separated by gray lines so they stay
    readable; larger images are tiled edge to edge as EDM does."""
    n = len(arrays)
    h, w, c = arrays[0].shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    gap = scale if scale > 1 else 0
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    th, tw = h * scale + gap, w * scale + gap
    grid = np.full([rows * th - gap, cols * tw - gap, c], 128 if gap else 0, dtype=np.uint8)
    for i, a in enumerate(arrays):
        r, q = divmod(i, cols)
        grid[r * th:r * th + h * scale, q * tw:q * tw + w * scale] = a.repeat(scale, 0).repeat(scale, 1)
    return grid


def write_images(outdir, subdirs, seeds, images, infos):
    """Write one PNG per seed (and its info JSON first: the PNG marks the seed as finished)."""
    try:
        for seed, image, info in zip(seeds, images, infos):
            path = run_record.image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if info is not None:
                misc.atomic_write_json(run_record.image_path(outdir, seed, subdirs, '.json'), info)
            misc.atomic_write_bytes(path, png_bytes(image))
    except OSError as e:      # this process's own images: only it knows
        raise UserError(f'--outdir: cannot write images to "{outdir}": {e.strerror}', local=True) from None


# ----------------------------------------------------------------------------------------------
# Checks that need the model (everything else: options.resolve).

def check_schedule_for_solver(opts, t_steps):
    """What --compat refuses for the schedule actually built (DEIS rhoAB crashes in the official
    code from some length on; a searched schedule's length is known only now)."""
    try:
        solvers.resolve_options(opts.solver, opts.solver_options, opts.compat, num_points=len(t_steps))
    except ValueError as e:
        raise UserError(str(e)) from None


def check_thresholding(opts, model):
    """Dynamic thresholding clamps the data prediction to [-1, 1]: wrong for autoencoder
    latents, which are not data in that range. --compat=gits-main thresholds them anyway, as the
    official code does (it is the point of compat)."""
    if opts.thresholding and opts.compat is None and model.latent_space:
        raise UserError(f'--thresholding: "{opts.dataset_name}" is a latent-space model (its latents are not data in '
                        '[-1, 1], which thresholding assumes); drop the flag')


def model_kwargs(opts):
    return dict(guidance_type=opts.guidance_type, guidance_rate=opts.guidance_rate, prompt=opts.prompt,
                prompt_file=opts.prompt_file, negative_prompt=opts.negative_prompt, use_fp16=opts.use_fp16,
                dtype=opts.dtype, resolution=opts.resolution)


def check_class_idx(opts, model):
    if opts.class_idx is None:
        return
    if not model.label_dim:
        raise UserError(f'--class_idx: "{opts.dataset_name}" is unconditional (it has no classes); drop the flag')
    if not 0 <= opts.class_idx < model.label_dim:
        raise UserError(f'--class_idx: must be in 0..{model.label_dim - 1} for "{opts.dataset_name}" (got {opts.class_idx})')


def load_model(opts, device):
    """The model, and the checks of the options against it."""
    model = models.load(opts.dataset_name, model_path=opts.model_path, device=device, **model_kwargs(opts))
    check_class_idx(opts, model)
    check_thresholding(opts, model)
    if hasattr(model, 'check_seeds'):     # e.g. SD with --prompt_file: every seed needs its prompt line
        model.check_seeds(opts.seed_list)
    return model


def announce(opts, model, t_steps, nfe, outdir, done):
    """Print the schedule in paste-able form (and the other forms asked for), and the resume."""
    dist.print0(f'Schedule ({len(t_steps)} points, {opts.solver}, NFE={nfe}): '
                f'--t_steps={schedules.format_t_steps(t_steps)}')
    for line in schedule_io.format_lines(t_steps, model, opts.schedule_format):
        dist.print0(line)
    if getattr(model, 'guidance_passes', 1) > 1:
        dist.print0(f'Classifier-free guidance: {nfe * model.guidance_passes} network passes per image batch row')
    if done:
        dist.print0(f'Resuming in {outdir}: {len(done)} of {len(opts.seed_list)} seeds already done')


def sample_seeds(opts, model, t_steps, seeds, outdir, device):
    """Sample `seeds` (this rank's share of their batches) and write a PNG per seed; with --grid,
    return this rank's (seed, image) pairs instead. PNG encoding and writing run on a background
    thread, so that on a GPU they overlap the next batch's sampling; at most one batch waits for its
    writes (bounded memory, errors surface). Another thread draws the next batch's per-seed noise
    meanwhile."""
    from tqdm import tqdm
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [b for b in (split_batches(seeds, opts.batch, world)[rank::world] if seeds else []) if b]
    sample_fn = solvers.SOLVERS[opts.solver]
    learned = {} if opts.coefficients is None else dict(coefficients=opts.coefficients)
    grid_parts = []
    start_scale = run_schedule.start_scale(opts, model, t_steps)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as drawer, \
            tqdm(total=len(batches), unit='batch', disable=(rank != 0), file=sys.stdout) as progress:
        pending = None
        for batch_seeds, inputs in drawn_ahead(batches, model.shape, model.label_dim, drawer):
            noise, denoise = seed_batch(model, batch_seeds, device, class_idx=opts.class_idx, inputs=inputs)
            x = noise * start_scale
            with torch.no_grad():
                x = sample_fn(denoise, x, t_steps, afs=bool(opts.afs), denoise_to_zero=opts.denoise_to_zero,
                              compat=opts.compat, **opts.solver_options, **learned)
                images = to_uint8(model.decode(x))
            if opts.grid:
                grid_parts.extend(zip(batch_seeds, images))
            else:
                infos = [model.image_info(seed) for seed in batch_seeds]
                if pending is not None:
                    pending.result()
                pending = writer.submit(write_images, outdir, opts.subdirs, batch_seeds, images, infos)
            progress.update(1)
        if pending is not None:
            pending.result()
    return grid_parts


def write_grid(opts, grid_parts, outdir):
    """One grid.png of every rank's images, in --seeds order (rank 0 writes it)."""
    parts = [p for rank_parts in dist.all_gather_object(grid_parts) for p in rank_parts]
    if dist.get_rank() == 0:
        position = {seed: i for i, seed in enumerate(opts.seed_list)}
        parts.sort(key=lambda p: position[p[0]])
        misc.atomic_write_bytes(os.path.join(outdir, 'grid.png'), png_bytes(make_grid([p[1] for p in parts])))


def run(opts):
    """Sample the run `opts` (options.Options, resolved): load the model, get the schedule, sample
    the seeds batch by batch, decode and write."""
    device = dist.init(opts.device)
    torch.backends.cudnn.benchmark = False
    model = load_model(opts, device)
    if opts.dp and opts.save_schedules is None:     # refuse a folder of another configuration before the search
        run_record.check_before_search(opts, model)

    t_steps, search_info = run_schedule.build_schedule(opts, model, device)
    if opts.save_schedules:
        dist.print0(f'Saved GITS schedules for num_steps {search_info["saved_num_steps"]} to {opts.save_schedules}')
        dist.shutdown()
        return
    check_schedule_for_solver(opts, t_steps)
    if opts.dp:                          # the learned coefficients a --refine_coefficients search kept
        opts = dataclasses.replace(opts, coefficients=run_schedule.searched_coefficients(search_info, opts.num_steps))
    run_schedule.warn_outside_model_range(t_steps, model)
    nfe = solvers.count_nfe(opts.solver, len(t_steps), afs=bool(opts.afs), denoise_to_zero=opts.denoise_to_zero,
                            compat=opts.compat, **opts.solver_options)
    outdir = opts.outdir or run_record.default_outdir(opts, nfe)
    dnnlib.util.check_writable_dir(outdir)
    run_json = run_record.record(opts, model, t_steps, nfe=nfe, outdir=outdir, device=device, search_info=search_info)
    done = dist.on_rank0(lambda: run_record.open_outdir(outdir, run_json, opts.seed_list, opts.subdirs, opts.grid))
    announce(opts, model, t_steps, nfe, outdir, done)

    finished = set(done)
    grid_parts = sample_seeds(opts, model, t_steps, [s for s in opts.seed_list if s not in finished], outdir, device)
    if opts.grid:
        write_grid(opts, grid_parts, outdir)
    dist.barrier()
    dist.print0(f'Done: {len(opts.seed_list)} seeds in {outdir}' + (f' ({len(done)} were already there)' if done else ''))
    dist.shutdown()

# ----------------------------------------------------------------------------------------------

def list_presets(ctx, _param, value):
    """--list_presets: print and exit before click asks for --dataset_name."""
    if value:
        click.echo('\n'.join(schedule_presets.describe()))
        ctx.exit(0)


@click.command(context_settings=dict(show_default=True))
# General options.
@click.option('--dataset_name', type=str, required=True, help='Model: ' + ', '.join(models.REGISTRY))
@click.option('--model_path', type=str, default=None, help='Local file or URL instead of the default download')
@click.option('--batch', type=click.IntRange(min=1), default=64, help='Total batch size over all processes')
@click.option('--seeds', type=str, default='0-63', help='Seeds, e.g. 0-63,100,200-299')
@click.option('--grid', type=BOOL, default=False, help='Write one grid image instead of one PNG per seed')
@click.option('--subdirs', type=BOOL, default=False, help='Put images in per-1000-seed subfolders')
@click.option('--outdir', type=str, default=None, help='Output folder [default: ./samples/<dataset_name>/<solver>_nfe<NFE>[_<schedule>][_afs][_dtz][_gits-main]]')
@click.option('--device', type=str, default=None, help='torch device [default: cuda if available, else cpu]')
@click.option('--class_idx', type=int, default=None, help='Class for class-conditional models [default: per seed]')
@click.option('--use_fp16', type=BOOL, default=None, help='Half precision for networks that support it [default: on for CUDA]')
@click.option('--dtype', type=click.Choice(list(models.DTYPES)), default=None, help='diffusers pipelines: network precision [default: the model card\'s half precision on CUDA, float32 on CPU]')
@click.option('--resolution', type=str, default=None, help='diffusers pipelines: image size, one number or HxW [default: the pipeline\'s own]')
# Solver options.
@click.option('--solver', type=click.Choice(list(SOLVER_NAMES)), default='ipndm', help='Student solver')
@click.option('--num_steps', type=click.IntRange(min=2), default=7, help='Number of time points (num_steps-1 steps)')
@click.option('--afs', type=BOOL, default=False, help='Analytical first step (saves one evaluation)')
@click.option('--denoise_to_zero', type=BOOL, default=False, help='Finish with D(x; t_last) (one more evaluation)')
# Schedule options.
@click.option('--schedule_type', type=click.Choice([*schedules.SCHEDULES, run_schedule.PIPELINE]), default='polynomial', help='Time schedule (pipeline: a diffusers pipeline\'s own scheduler sigmas)')
@click.option('--schedule_rho', type=float, default=7.0, help='Schedule exponent')
@click.option('--t_steps', type=str, default=None, help='Explicit schedule, e.g. [80,10.9836,...,0.002], or a preset, e.g. gits_sd15:coeff=1.20:steps=10 (see --list_presets)')
@click.option('--list_presets', is_flag=True, is_eager=True, expose_value=False, callback=list_presets,
              help='Print the named schedules --t_steps takes, and exit')
@click.option('--schedule_format', type=click.Choice(list(schedule_io.FORMATS)), default='t_steps',
              help='Also print the schedule as diffusers sigmas/timesteps or ComfyUI SIGMAS (run.json holds all forms)')
@click.option('--sigma_min', type=float, default=None, help='Lowest noise level [default: the model\'s]')
@click.option('--sigma_max', type=float, default=None, help='Highest noise level [default: the model\'s]')
# Additional solver options (None: the solver's own default).
@click.option('--max_order', type=int, default=None, help='Order of multistep solvers: 1-4 ipndm/ipndm_v/deis, 1-3 dpmpp/unipc')
@click.option('--predict_x0', type=BOOL, default=None, help='dpmpp/unipc: data prediction [default: True]')
@click.option('--lower_order_final', type=BOOL, default=None, help='dpmpp/unipc: lower order at the end [default: True]')
@click.option('--variant', type=str, default=None, help='unipc: bh1 or bh2 [default: bh2]')
@click.option('--deis_mode', type=str, default=None, help='deis: tab or rhoab [default: tab]')
@click.option('--thresholding', type=BOOL, default=None, help='dpmpp/unipc with predict_x0: dynamic thresholding of the data prediction (pixel-space models) [default: False; True with --compat=gits-main]')
@click.option('--compat', type=str, default=None, help='gits-main: reproduce the official GITS code (zju-pi/diff-sampler) instead of the correct mathematics where they differ (docs/official-differences.md)')
# Guidance options.
@click.option('--guidance_type', type=click.Choice(list(models.GUIDANCE_TYPES)), default=None, help='cg, cfg or uncond')
@click.option('--guidance_rate', type=float, default=None, help='Guidance scale')
@click.option('--prompt', type=str, default=None, help='Prompt for Stable Diffusion')
@click.option('--prompt_file', type=str, default=None, help='Prompts, one a line or MS-COCO captions JSON; prompt i for seed i')
@click.option('--negative_prompt', type=str, default=None, help='diffusers pipelines: the negative prompt of classifier-free guidance')
# GITS options.
@click.option('--dp', type=BOOL, default=False, help='Search the schedule with GITS dynamic programming')
@click.option('--metric', type=click.Choice(list(gits.METRICS)), default=gits.METRIC, help='GITS cost metric')
@click.option('--coeff', type=float, default=gits.COEFF, help='GITS DP coefficient (> 0)')
@click.option('--num_warmup', type=int, default=gits.NUM_WARMUP, help='GITS warm-up trajectories')
@click.option('--solver_tea', type=click.Choice(list(SOLVER_NAMES)), default=gits.SOLVER_TEA, help='GITS teacher solver')
@click.option('--num_steps_tea', type=click.IntRange(min=3), default=gits.NUM_STEPS_TEA, help='GITS teacher time points')
@click.option('--warmup_seed', type=click.IntRange(min=0), default=gits.WARMUP_SEED, help='First seed of the GITS warm-up noise')
@click.option('--save_schedules', type=str, default=None, help='GITS: search once, save schedules for several NFEs to this JSON file, and exit')
@click.option('--save_num_steps', type=str, default=None, help='GITS: num_steps values for --save_schedules, e.g. 4-11 [default: --num_steps]')
@click.option('--schedule_file', type=str, default=None, help='Sample with the schedule for --num_steps from a file written by --save_schedules')
@click.option('--search', type=click.Choice(['gits', 'student', 'rotation']), default=None, help='GITS cost: gits (one Euler step, the paper) or student (the student solver\'s own step); rotation: equal total rotation along the teacher trajectories (no DP) [default: gits]')
@click.option('--refine', type=BOOL, default=False, help='GITS: refine the searched schedule on the warm-up set (student\'s final-point error)')
@click.option('--refine_budget', type=float, default=None, help='GITS: refinement evaluations, in multiples of the teacher run\'s [default: 6; 12 with --refine_coefficients]')
@click.option('--refine_coefficients', type=BOOL, default=False, help='GITS: the refinement also fits the multistep solver\'s step weights and evaluation noise levels (saved in schedule files)')
def main(**kwargs):
    """Sample images from a diffusion model with a fast ODE solver."""
    run(options.resolve(kwargs, dnnlib.util.explicit_flags(click.get_current_context())))


if __name__ == '__main__':
    dnnlib.run_cli(main)
