"""The run record: which configuration an output folder of sample.py holds (run.json), resuming
into it, and the default folder name.

IDENTITY lists everything that determines the images; run.json records each at its top level,
and a rerun into a folder whose run.json differs in any of them is refused, so a folder only ever
holds images of one configuration and resuming only adds to them. A new option that changes images
joins with one line (a key an older run.json lacks counts as None). Left out on purpose, because
the images do not depend on them: --seeds (a rerun adds seeds), --batch and the number of processes
(identical images, tested), --outdir, --device (devices may round differently, but it is the same
run; the precision that matters is use_fp16), --guidance_type (one valid value per model; the rate
is what acts), --model_path as text (the checkpoint's content is what counts), --schedule_format
(it only prints), and how the schedule was obtained (only the exact t_steps: a searched schedule
pasted back with --t_steps, or read from a schedule file, continues the same folder).
"""

import json
import os
import re
import typing

import dnnlib
import run_schedule
import schedule_io
import solver_utils
import solvers
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc


class Run(typing.NamedTuple):
    opts: object        # options.Options
    model: object
    t_steps: object     # None before the schedule is known


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
    'negative_prompt': lambda r: r.opts.negative_prompt,
    'dtype': lambda r: str(r.model.dtype).removeprefix('torch.') if hasattr(r.model, 'pipeline_sigmas') else None,
    'resolution': lambda r: [r.model.height, r.model.width] if hasattr(r.model, 'pipeline_sigmas') else None,
    'start_scale': lambda r: start_scale_identity(r),   # None: sampling starts at t_steps[0]
    'grid': lambda r: bool(r.opts.grid),          # one grid.png, or one PNG per seed
    'subdirs': lambda r: bool(r.opts.subdirs),    # where the PNGs lie
    'coefficients': lambda r: getattr(r.opts, 'coefficients', None),   # learned solver weights (issue 29)
}
OMITTED_WHEN_NONE = ('coefficients',)    # keys added later: absent at None, so older run.json files keep their bytes
def start_scale_identity(r):
    """Where sampling starts, when that is not t_steps[0] (--schedule_type=pipeline: the pipeline's
    own start), so that a pasted copy of a pipeline schedule does not continue its folder."""
    if r.t_steps is None:
        return None
    scale = run_schedule.start_scale(r.opts, r.model, r.t_steps)
    return None if scale == float(r.t_steps[0]) else scale


LABELS = {'checkpoint': 'the checkpoint', 't_steps': 'the schedule (t_steps)',
          'coefficients': 'the learned coefficients (--refine_coefficients)'}
RUN_FORMAT = 'gits-run-v2'


def checkpoint_identity(model, model_path):
    """Size and head/tail hash of each file the weights came from (misc.file_fingerprint: cheap,
    and unlike a path or a modification time it follows the content); the --model_path text for
    a model that does not name its files; None for the built-in analytic models."""
    files = getattr(model, 'checkpoint_files', ())
    if files:
        return [misc.file_fingerprint(f) for f in files]
    return model_path


def identity(opts, model, t_steps):
    """The IDENTITY values of a run, as JSON stores them."""
    run = Run(opts, model, t_steps)
    values = {key: fn(run) for key, fn in IDENTITY.items()}
    return json.loads(json.dumps({k: v for k, v in values.items() if not (k in OMITTED_WHEN_NONE and v is None)}))


def record(opts, model, t_steps, *, nfe, outdir, device, search_info):
    """run.json: the identity, then what else describes the run (it is written by open_outdir)."""
    return dict(format=RUN_FORMAT, **identity(opts, model, t_steps), nfe=nfe,
                t_steps_text=solver_utils.format_t_steps(t_steps), exports=schedule_io.exports(t_steps, model),
                schedule_source=run_schedule.schedule_tag(opts), search=search_info,
                checkpoint_files=[os.path.abspath(f) for f in getattr(model, 'checkpoint_files', ())],
                options=dict(opts.command_line(), outdir=outdir, device=str(device)), given=sorted(opts.given),
                world_size=dist.get_world_size())


# ----------------------------------------------------------------------------------------------
# The output folder belongs to one configuration.

def image_path(outdir, seed, subdirs, ext='.png'):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}{ext}')


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
        if isinstance(old, dict) and isinstance(new, dict) and key not in LABELS:
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


def check_before_search(opts, model):
    """Refuse a folder of another configuration before a GITS search spends its time (the
    schedule is not known yet: every other identity key is compared)."""
    nfe = solvers.count_nfe(opts.solver, run_schedule.expected_points(opts), afs=bool(opts.afs),
                            denoise_to_zero=opts.denoise_to_zero, compat=opts.compat, **opts.solver_options)
    outdir = opts.outdir or default_outdir(opts, nfe)
    dnnlib.util.check_writable_dir(outdir)
    dist.on_rank0(lambda: check_outdir(outdir, identity(opts, model, None), skip=('t_steps', 'coefficients')))


def open_outdir(outdir, run_json, seeds, subdirs, grid):
    """On rank 0: check the folder against `run_json`, write it, and return the seeds whose PNG
    is already there (none for a grid, which is drawn whole)."""
    check_outdir(outdir, {k: run_json.get(k) for k in IDENTITY})
    try:
        os.makedirs(outdir, exist_ok=True)
        done = [] if grid else [s for s in seeds if os.path.isfile(image_path(outdir, s, subdirs))]
        misc.atomic_write_json(os.path.join(outdir, 'run.json'), dict(run_json, seeds_already_done=len(done)))
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
             'afs' if opts.afs else '', 'dtz' if opts.denoise_to_zero else '', opts.compat or '']
    return os.path.join('samples', opts.dataset_name, '_'.join(p for p in parts if p))
