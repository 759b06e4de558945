"""Sample a pretrained diffusion model with a fast ODE solver, optionally on a GITS schedule.

    python sample.py --dataset_name=digits --seeds=0-63 --grid=True
    torchrun --standalone --nproc_per_node=2 sample.py --dataset_name=gmm --seeds=0-999

Every image is a pure function of its seed (noise and class label are drawn from a generator
seeded by the seed alone), so batch size, process count and interruptions do not change it.
"""

import concurrent.futures
import json
import math
import os
import re
import sys

import click
import numpy as np
import torch
from PIL import Image

import dnnlib
import gits
import models
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
            path = image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if info is not None:
                misc.atomic_write_json(image_path(outdir, seed, subdirs, '.json'), info)
            misc.atomic_write_bytes(path, png_bytes(image))
    except OSError as e:      # this process's own images: only it knows
        raise UserError(f'--outdir: cannot write images to "{outdir}": {e.strerror}', local=True) from None


def image_path(outdir, seed, subdirs, ext='.png'):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}{ext}')


# ----------------------------------------------------------------------------------------------
# Validation helpers: each raises UserError with one line that names the flag.

def parse_seeds(text):
    try:
        seeds = misc.parse_int_list(text)
    except ValueError as e:
        raise UserError(f'--seeds: {e}; expected e.g. 0-63,100,200-299') from None
    seen = set()
    for s in seeds:
        if s in seen:
            raise UserError(f'--seeds: seed {s} is listed twice (each seed is one image)')
        seen.add(s)
    return seeds


# ----------------------------------------------------------------------------------------------
# The output folder belongs to one configuration.
#
# IDENTITY lists everything that determines the images; run.json records each at its top level,
# and a rerun into a folder whose run.json differs in any of them is refused, so a folder only
# ever holds images of one configuration and resuming only adds to them. A new option that changes
# images joins with one line (a key an older run.json lacks counts as None). Left out on purpose,
# because the images do not depend on them: --seeds (a rerun adds seeds), --batch and the number of
# processes (identical images, tested), --outdir, --device (devices may round differently, but it
# is the same run; the precision that matters is use_fp16), --guidance_type (one valid value per
# model; the rate is what acts), --model_path as text (the checkpoint's content is what counts),
# and how the schedule was obtained (only the exact t_steps: a searched schedule pasted back with
# --t_steps, or read from a schedule file, continues the same folder).

IDENTITY = {
    'dataset_name': lambda r: r.opts.dataset_name,
    'checkpoint': lambda r: checkpoint_identity(r.model, r.opts.model_path),
    'solver': lambda r: r.opts.solver,
    'solver_options': lambda r: r.opts.solver_options,
    'compat': lambda r: r.opts.compat,            # None, or 'gits-main': the official code's computations
    't_steps': lambda r: [float(t) for t in r.t_steps] if r.t_steps is not None else None,
    'afs': lambda r: bool(r.opts.afs),
    'denoise_to_zero': lambda r: bool(r.opts.denoise_to_zero),
    'class_idx': lambda r: r.opts.class_idx,
    'guidance_rate': lambda r: getattr(r.model, 'guidance_rate', None),
    'prompt': lambda r: r.opts.prompt,
    'prompt_file': lambda r: misc.file_fingerprint(r.opts.prompt_file, whole=True) if r.opts.prompt_file else None,
    'use_fp16': lambda r: bool(getattr(r.model, 'use_fp16', False)),
    'grid': lambda r: bool(r.opts.grid),          # one grid.png, or one PNG per seed
    'subdirs': lambda r: bool(r.opts.subdirs),    # where the PNGs lie
}
LABELS = {'checkpoint': 'the checkpoint', 't_steps': 'the schedule (t_steps)'}
RUN_FORMAT = 'gits-run-v2'


def checkpoint_identity(model, model_path):
    """Size and head/tail hash of each file the weights came from (misc.file_fingerprint: cheap,
    and unlike a path or a modification time it follows the content); the --model_path text for
    a model that does not name its files; None for the built-in analytic models."""
    files = getattr(model, 'checkpoint_files', ())
    if files:
        return [misc.file_fingerprint(f) for f in files]
    return model_path


def identity(r):
    """The IDENTITY values of run `r` (opts, model, t_steps), as JSON stores them."""
    return json.loads(json.dumps({key: fn(r) for key, fn in IDENTITY.items()}))


def differences(theirs, ours, skip=()):
    """The settings in which `ours` differs from a run.json, for a one-line message."""
    def show(key, old, new):
        text = f'{old} -> {new}'
        return f'--{key} ({text})' if key not in LABELS and len(text) < 40 else LABELS.get(key, f'--{key}')
    out = []
    for key, new in ours.items():
        old = theirs.get(key)
        if key in skip or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += [show(k, old.get(k), new.get(k)) for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
        else:
            out.append(show(key, old, new))
    return out


def has_images(outdir):
    """Whether `outdir` holds images a run of sample.py would have written."""
    name = re.compile(r'\d{6}\.png|grid\.png')
    for entry in os.scandir(outdir):
        if entry.is_file() and name.fullmatch(entry.name):
            return True
        if entry.is_dir() and re.fullmatch(r'\d{6}', entry.name) and any(
                name.fullmatch(f) for f in os.listdir(entry.path)):
            return True
    return False


def check_outdir(outdir, ours, skip=()):
    """UserError unless `outdir` is new, empty of images, or holds a run of this same
    configuration (its run.json matches `ours`, except the keys in `skip`)."""
    path = os.path.join(outdir, 'run.json')
    if not os.path.isdir(outdir):
        return
    if not os.path.exists(path):
        if has_images(outdir):
            raise UserError(f'--outdir: "{outdir}" holds images but no run.json, so their configuration is unknown; '
                            'pass another --outdir')
        return
    try:
        with open(path) as f:
            theirs = json.load(f)
        if not isinstance(theirs, dict) or theirs.get('format') != RUN_FORMAT:
            raise ValueError('not a run record of this version')
    except (OSError, ValueError) as e:
        raise UserError(f'--outdir: cannot tell the configuration of "{outdir}" from its run.json ({e}); '
                        'pass another --outdir') from None
    diff = differences(theirs, ours, skip)
    if diff:
        raise UserError(f'--outdir: "{outdir}" holds images of another configuration (it differs in '
                        f'{", ".join(diff)}); pass another --outdir or remove the folder')


def open_outdir(outdir, record, seeds, subdirs, grid):
    """On rank 0: check the folder against `record`, write run.json, and return the seeds whose
    PNG is already there (none for a grid, which is drawn whole)."""
    check_outdir(outdir, {k: record[k] for k in IDENTITY})
    try:
        os.makedirs(outdir, exist_ok=True)
        done = [] if grid else [s for s in seeds if os.path.isfile(image_path(outdir, s, subdirs))]
        misc.atomic_write_json(os.path.join(outdir, 'run.json'), dict(record, seeds_already_done=len(done)))
    except OSError as e:
        raise UserError(f'--outdir: cannot write to "{outdir}": {e.strerror}') from None
    return done


def default_outdir(opts, nfe):
    """samples/<dataset_name>/<solver>_nfe<NFE>[_<schedule>][_afs][_dtz][_gits-main]: the schedule's source
    (run_schedule.schedule_tag; none for EDM's polynomial rho 7), afs and denoise_to_zero are
    in the name, so that such runs never meet in one folder. Runs that differ in anything else of
    IDENTITY would, and the second is refused (check_outdir)."""
    tag = run_schedule.schedule_tag(opts)
    parts = [f'{opts.solver}_nfe{nfe}', '' if tag == 'polynomial' else tag,
             'afs' if opts.afs else '', 'dtz' if opts.denoise_to_zero else '', opts.get('compat') or '']
    return os.path.join('samples', opts.dataset_name, '_'.join(p for p in parts if p))


# ----------------------------------------------------------------------------------------------

def validate(opts, given=()):
    """All checks that need no model, before anything expensive; raises UserError. Fills derived
    fields into `opts`. `given`: the options named on the command line."""
    opts.seed_list = parse_seeds(opts.seeds)
    if opts.dataset_name not in models.REGISTRY:
        raise UserError(f'--dataset_name: unknown model "{opts.dataset_name}"; choose one of {", ".join(models.REGISTRY)}')
    dist.check_device(opts.device)
    opts.t_steps_list = None
    sources = [flag for flag, given_ in (('--t_steps', opts.t_steps is not None),
                                          ('--schedule_file', opts.schedule_file is not None),
                                          ('--dp', opts.dp)) if given_]
    if len(sources) > 1:      # each of them fixes the schedule: refuse rather than silently pick one
        raise UserError(f'{sources[-1]}: cannot be combined with {sources[0]} (each one sets the schedule); drop one of them')
    try:
        schedules.check_compat(opts.compat)
        if opts.t_steps is not None:
            opts.t_steps_list = schedules.parse_t_steps(opts.t_steps)
            if opts.compat is not None:     # the official reads --t_steps into a float32 tensor
                opts.t_steps_list = schedules.check_t_steps(np.float32(opts.t_steps_list).tolist())
        resolve_solver_options(opts)
    except ValueError as e:
        raise UserError(str(e)) from None
    if opts.sigma_min is not None and opts.sigma_min <= 0:
        raise UserError(f'--sigma_min: must be positive (got {opts.sigma_min})')
    if opts.sigma_max is not None and opts.sigma_min is not None and opts.sigma_max <= opts.sigma_min:
        raise UserError('--sigma_max: must be larger than --sigma_min')
    run_schedule.check_flags(opts, given)
    if opts.outdir is not None:
        dnnlib.util.check_writable_dir(opts.outdir)


def resolve_solver_options(opts):
    """opts.solver_flags: the solver option flags as given (None: not given); opts.solver_options:
    the student's resolved options; with --dp also opts.teacher_options (the teacher takes the
    student's options, as in the official code: gits.search_options). ValueError naming the flag."""
    opts.solver_flags = dict(max_order=opts.max_order, predict_x0=opts.predict_x0,
                             lower_order_final=opts.lower_order_final, variant=opts.variant,
                             deis_mode=opts.deis_mode, thresholding=opts.thresholding)
    if opts.dp:
        opts.solver_options, opts.teacher_options = gits.search_options(
            opts.solver, opts.solver_tea, opts.solver_flags, opts.compat, opts.num_steps_tea)
        return
    failure = solvers.official_max_order_failure(opts.solver, opts.solver_flags, opts.compat)
    if failure:
        raise ValueError(failure)
    points = len(opts.t_steps_list) if opts.t_steps_list is not None else opts.num_steps
    opts.solver_options = solvers.resolve_options(opts.solver, opts.solver_flags, opts.compat,
                                                  num_points=None if opts.schedule_file else points)


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
                prompt_file=opts.prompt_file, use_fp16=opts.use_fp16)


def check_class_idx(opts, model):
    if opts.class_idx is None:
        return
    if not model.label_dim:
        raise UserError(f'--class_idx: "{opts.dataset_name}" is unconditional (it has no classes); drop the flag')
    if not 0 <= opts.class_idx < model.label_dim:
        raise UserError(f'--class_idx: must be in 0..{model.label_dim - 1} for "{opts.dataset_name}" (got {opts.class_idx})')


def run(opts, given=()):
    validate(opts, given)
    device = dist.init(opts.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.backends.cudnn.benchmark = False

    model = models.load(opts.dataset_name, model_path=opts.model_path, device=device, **model_kwargs(opts))
    check_class_idx(opts, model)
    check_thresholding(opts, model)
    if hasattr(model, 'check_seeds'):     # e.g. SD with --prompt_file: every seed needs its prompt line
        model.check_seeds(opts.seed_list)
    state = dnnlib.EasyDict(opts=opts, model=model, t_steps=None)
    afs = bool(opts.afs)
    if opts.dp and opts.save_schedules is None:     # refuse a folder of another configuration before the search
        nfe = solvers.count_nfe(opts.solver, run_schedule.expected_points(opts), afs=afs,
                                denoise_to_zero=opts.denoise_to_zero, compat=opts.compat, **opts.solver_options)
        outdir = opts.outdir or default_outdir(opts, nfe)
        dnnlib.util.check_writable_dir(outdir)
        dist.on_rank0(lambda: check_outdir(outdir, identity(state), skip=('t_steps',)))

    t_steps, search_info = run_schedule.build_schedule(opts, model, device)
    if opts.save_schedules:
        dist.print0(f'Saved GITS schedules for num_steps {search_info["saved_num_steps"]} to {opts.save_schedules}')
        dist.shutdown()
        return
    state.t_steps = t_steps
    check_schedule_for_solver(opts, t_steps)
    nfe = solvers.count_nfe(opts.solver, len(t_steps), afs=afs, denoise_to_zero=opts.denoise_to_zero,
                            compat=opts.compat, **opts.solver_options)
    outdir = opts.outdir or default_outdir(opts, nfe)
    dnnlib.util.check_writable_dir(outdir)
    t_text = schedules.format_t_steps(t_steps)
    options = {p.name: opts.get(p.name) for p in main.params}
    options.update(outdir=outdir, device=str(device))
    record = dict(format=RUN_FORMAT, **identity(state), nfe=nfe, t_steps_text=t_text,
                  exports=schedule_io.exports(t_steps, model),
                  schedule_source=run_schedule.schedule_tag(opts), search=search_info,
                  checkpoint_files=[os.path.abspath(f) for f in getattr(model, 'checkpoint_files', ())],
                  options=options, given=sorted(given), world_size=world)
    done = dist.on_rank0(lambda: open_outdir(outdir, record, opts.seed_list, opts.subdirs, opts.grid))
    dist.print0(f'Schedule ({len(t_steps)} points, {opts.solver}, NFE={nfe}): --t_steps={t_text}')
    for line in schedule_io.format_lines(t_steps, model, opts.schedule_format):
        dist.print0(line)
    if getattr(model, 'guidance_passes', 1) > 1:
        dist.print0(f'Classifier-free guidance: {nfe * model.guidance_passes} network passes per image batch row')
    if done:
        dist.print0(f'Resuming in {outdir}: {len(done)} of {len(opts.seed_list)} seeds already done')

    finished = set(done)
    seeds = [s for s in opts.seed_list if s not in finished]
    batches = split_batches(seeds, opts.batch, world)[rank::world] if seeds else []
    sample_fn = solvers.SOLVERS[opts.solver]
    grid_parts = []
    from tqdm import tqdm
    # PNG encoding and writing run on a background thread, so that on a GPU they overlap the next
    # batch's sampling; at most one batch waits for its writes (bounded memory, errors surface).
    # Another thread draws the next batch's per-seed noise meanwhile.
    batches = [b for b in batches if b]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as drawer, \
            tqdm(total=len(batches), unit='batch', disable=(rank != 0), file=sys.stdout) as progress:
        pending = None
        for batch_seeds, inputs in drawn_ahead(batches, model.shape, model.label_dim, drawer):
            noise, denoise = seed_batch(model, batch_seeds, device, class_idx=opts.class_idx, inputs=inputs)
            x = noise * float(t_steps[0])
            with torch.no_grad():
                x = sample_fn(denoise, x, t_steps, afs=afs, denoise_to_zero=opts.denoise_to_zero,
                              compat=opts.compat, **opts.solver_options)
                images = to_uint8(model.decode(x))
            if opts.grid:
                grid_parts.extend(zip(batch_seeds, images))
                progress.update(1)
                continue
            infos = [model.image_info(seed) for seed in batch_seeds]
            if pending is not None:
                pending.result()
            pending = writer.submit(write_images, outdir, opts.subdirs, batch_seeds, images, infos)
            progress.update(1)
        if pending is not None:
            pending.result()

    if opts.grid:
        parts = [p for rank_parts in dist.all_gather_object(grid_parts) for p in rank_parts]
        if rank == 0:
            position = {seed: i for i, seed in enumerate(opts.seed_list)}
            parts.sort(key=lambda p: position[p[0]])
            misc.atomic_write_bytes(os.path.join(outdir, 'grid.png'), png_bytes(make_grid([p[1] for p in parts])))
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
# Solver options.
@click.option('--solver', type=click.Choice(list(SOLVER_NAMES)), default='ipndm', help='Student solver')
@click.option('--num_steps', type=click.IntRange(min=2), default=7, help='Number of time points (num_steps-1 steps)')
@click.option('--afs', type=BOOL, default=False, help='Analytical first step (saves one evaluation)')
@click.option('--denoise_to_zero', type=BOOL, default=False, help='Finish with D(x; t_last) (one more evaluation)')
# Schedule options.
@click.option('--schedule_type', type=click.Choice(list(schedules.SCHEDULES)), default='polynomial', help='Time schedule')
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
@click.option('--compat', type=str, default=None, help='gits-main: reproduce the official GITS code (zju-pi/diff-sampler) instead of the correct mathematics where they differ (README: Differences from the official code)')
# Guidance options.
@click.option('--guidance_type', type=click.Choice(list(models.GUIDANCE_TYPES)), default=None, help='cg, cfg or uncond')
@click.option('--guidance_rate', type=float, default=None, help='Guidance scale')
@click.option('--prompt', type=str, default=None, help='Prompt for Stable Diffusion')
@click.option('--prompt_file', type=str, default=None, help='Prompts, one a line or MS-COCO captions JSON; prompt i for seed i')
# GITS options.
@click.option('--dp', type=BOOL, default=False, help='Search the schedule with GITS dynamic programming')
@click.option('--metric', type=click.Choice(list(gits.METRICS)), default='dev', help='GITS cost metric')
@click.option('--coeff', type=float, default=1.15, help='GITS DP coefficient (> 0)')
@click.option('--num_warmup', type=int, default=256, help='GITS warm-up trajectories')
@click.option('--solver_tea', type=click.Choice(list(SOLVER_NAMES)), default='ipndm', help='GITS teacher solver')
@click.option('--num_steps_tea', type=int, default=61, help='GITS teacher time points')
@click.option('--warmup_seed', type=click.IntRange(min=0), default=1_000_000_000, help='First seed of the GITS warm-up noise')
@click.option('--save_schedules', type=str, default=None, help='GITS: search once, save schedules for several NFEs to this JSON file, and exit')
@click.option('--save_num_steps', type=str, default=None, help='GITS: num_steps values for --save_schedules, e.g. 4-11 [default: --num_steps]')
@click.option('--schedule_file', type=str, default=None, help='Sample with the schedule for --num_steps from a file written by --save_schedules')
@click.option('--search', type=click.Choice(['gits', 'student']), default=None, help='GITS cost: gits (one Euler step, the paper) or student (the student solver\'s own step) [default: gits]')
@click.option('--refine', type=BOOL, default=False, help='GITS: refine the searched schedule on the warm-up set (student\'s final-point error)')
@click.option('--refine_budget', type=float, default=None, help='GITS: refinement evaluations, in multiples of the teacher run\'s [default: 6]')
def main(**kwargs):
    """Sample images from a diffusion model with a fast ODE solver."""
    run(dnnlib.EasyDict(kwargs), dnnlib.util.explicit_flags(click.get_current_context()))


if __name__ == '__main__':
    dnnlib.run_cli(main)
