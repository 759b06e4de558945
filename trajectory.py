"""Trajectory regularity of ODE-based diffusion sampling, and schedule comparisons.

    python trajectory.py analyze --dataset_name=digits --seeds=0-15
    python trajectory.py geometry --dataset_name=digits --seeds=0-31 --window=7
    python trajectory.py schedules --dataset_name=gmm --num_steps=7 --num_warmup=64

`analyze` records sampling trajectories x(t_i) of any model (a fine solver run with every
intermediate point kept) together with the denoising trajectory D(x(t_i); t_i), and measures
their shape: every point's distance from the straight line through the trajectory's first and
last points. Sampling trajectories deviate little and in a "boomerang" profile (zero at both
ends, one hump in between) whatever the content; denoising trajectories settle early. A 3-D
view uses the start-end direction plus the two directions that carry most of the deviation.
Outputs: profile.png, traj_3d.png and trajectory.json (every profile, per seed).

`geometry` measures the Frenet-Serret curvature kappa(s) and torsion tau(s) of the same trajectories
projected onto their 3-D chord frame (a local cubic fit in arc length over --window points), where
along them the rotation sqrt(kappa^2 + tau^2) ds concentrates, and their Procrustes alignment to the
first seed's in 2-D and 3-D (curvature.png, rotation.png, procrustes.png, geometry.json).

`schedules` draws the polynomial, logsnr and time_uniform schedules next to the GITS schedule
searched for the same model, solver and number of steps (schedules.png, schedules.json). For
the analytic models (gmm, gmm_wavelet, digits) it can also measure each schedule's true error.

`stats` (torchrun-aware) measures many seeds' trajectories and keeps per-seed scalars only: the
norms of x_t, D(x_t; t) and the noise estimate (x_t - D) / t, both trajectories' distance from
their chord, and the cosine between the noise estimate and x_t - x_0; summaries per noise level in
stats.json, stats.png, the per-seed values in per_seed.npz.

`dataset` writes an analytic model's data set as a zip (dataset_tool's layout, with labels), and
`optimal --data=...` compares the model with the optimal (kernel) denoiser of a data set and with
analytic scores fitted to it (Gaussian, low-rank Gaussian, per-class mixture): trajectories from
the same noise, and the fitted denoisers evaluated on the model's own states (optimal.json,
optimal.png, samples.png, per_seed.npz).
"""

import json
import os

import click
import numpy as np
import torch

import dnnlib
import geometry
import gits
import models
import options as cli_options
import run_schedule
import solver_utils
import solvers
import trajectory_stats
from dnnlib.util import UserError
from models import empirical
from geometry import line_deviation, project, projection_basis   # noqa: F401 (trajectory.* names kept)
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.seeds import seed_batch

BOOL = click.BOOL


# ----------------------------------------------------------------------------------------------
# Recording.

def record_trajectories(denoise, noise, t_steps, solver='ipndm', **options):
    """Sampling trajectory xs [N, B, ...] from x = noise * t_steps[0], and the denoising
    trajectory dens [N, B, ...] with dens[i] = D(xs[i]; t_steps[i]). Both float64 on the CPU."""
    rec = solver_utils.Recorder(denoise, keep=True)
    x0 = noise * float(t_steps[0])
    with torch.no_grad():
        _, xs = solvers.SOLVERS[solver](rec, x0, t_steps, return_inters=True, **options)
        dens = []
        for x, t in zip(xs, t_steps):
            out = rec.lookup(x, float(t))
            dens.append(out if out is not None else denoise(x, float(t)))   # e.g. the last point
    return xs.detach().to('cpu', torch.float64), torch.stack(dens).to('cpu', torch.float64)


# ----------------------------------------------------------------------------------------------
# Geometry (geometry.py). Points are [N, B, D] float64: N points along each of B trajectories.

def profile_stats(points):
    """Deviation profile of each trajectory and summaries, as plain lists for the JSON."""
    dev = line_deviation(points)                                        # [N, B]
    chord = (points[-1] - points[0]).norm(dim=-1)                       # [B]
    rel = dev / chord.clamp_min(1e-300)
    return dict(deviation=dev.T.tolist(), relative_deviation=rel.T.tolist(), chord_length=chord.tolist(),
                mean=dev.mean(1).tolist(), std=dev.std(1, unbiased=False).tolist(),
                relative_mean=rel.mean(1).tolist(), max_relative=rel.max(0).values.tolist())


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend: no display needed).

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi=110):
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi, bbox_inches='tight')
    misc.atomic_write_bytes(path, buf.getvalue())


def plot_profiles(path, t_steps, sampling_dev, denoising_dev, title):
    """Deviation from the start-end line against sigma (sampling runs left to right)."""
    plt = _pyplot()
    t = np.asarray([float(v) for v in t_steps])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, dev, name, color in [(axes[0], sampling_dev, 'sampling trajectory $x_t$', 'tab:blue'),
                                 (axes[1], denoising_dev, r'denoising trajectory $D(x_t; t)$', 'tab:orange')]:
        d = dev.numpy()
        for b in range(d.shape[1]):
            ax.plot(t, d[:, b], color=color, alpha=0.25, lw=0.8)
        ax.plot(t, d.mean(1), color=color, lw=2.2, label=f'mean of {d.shape[1]}')
        ax.set_xscale('log')
        ax.invert_xaxis()
        ax.set_xlabel(r'noise level $\sigma$ (sampling goes left to right)')
        ax.set_ylabel('distance from the start-end line')
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(loc='upper left', fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_3d(path, xs, dens, basis, title, max_plots=4):
    """Each trajectory (and its denoising trajectory) in its own 3-D basis: the start-end
    direction and the two leading directions of its deviation."""
    plt = _pyplot()
    n = min(max_plots, xs.shape[1])
    fig = plt.figure(figsize=(4.2 * n, 4.2))
    px = project(xs[:, :n], xs[0, :n], basis[:n]).numpy()
    pd = project(dens[:, :n], xs[0, :n], basis[:n]).numpy()
    for b in range(n):
        ax = fig.add_subplot(1, n, b + 1, projection='3d')
        ax.plot(px[:, b, 0], px[:, b, 1], px[:, b, 2], '.-', color='tab:blue', ms=3, lw=1.2, label='sampling')
        ax.plot(pd[:, b, 0], pd[:, b, 1], pd[:, b, 2], '.-', color='tab:orange', ms=3, lw=1.2, label='denoising')
        ax.plot(px[[0, -1], b, 0], px[[0, -1], b, 1], px[[0, -1], b, 2], ':', color='gray', lw=1)
        ax.scatter(*px[0, b], color='black', s=18)
        ax.scatter(*px[-1, b], color='red', s=18)
        ax.set_xlabel('start-end', fontsize=8)
        ax.set_ylabel('dev. dir. 1', fontsize=8)
        ax.set_zlabel('dev. dir. 2', fontsize=8)
        ax.tick_params(labelsize=6)
        if b == 0:
            ax.legend(fontsize=7, loc='upper left')
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_schedules(path, schedules, title, errors=None):
    """Noise levels against step index on a log axis, one line per schedule; with `errors`, a
    second panel with each schedule's RMSE against the exact ODE solution."""
    plt = _pyplot()
    panels = 2 if errors else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    markers = dict(polynomial='o', logsnr='s', time_uniform='^', gits='D')
    for name, ts in schedules.items():
        ts = [float(v) for v in ts]
        ax.plot(range(len(ts)), ts, marker=markers.get(name.split()[0], 'o'), lw=2.2 if name.startswith('gits') else 1.2,
                label=name)
    ax.set_yscale('log')
    ax.set_xlabel('step index')
    ax.set_ylabel(r'noise level $\sigma$')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    if errors:
        ax = axes[0, 1]
        names = list(errors)
        ax.bar(range(len(names)), [errors[k] for k in names], color=[f'C{i}' for i in range(len(names))])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel('RMSE vs. exact ODE solution (per seed, mean)')
        ax.grid(alpha=0.3, axis='y')
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Shared CLI plumbing.

def load_model(opts):
    device = dist.check_device(opts.device)
    model = models.load(opts.dataset_name, model_path=opts.model_path, device=device,
                        guidance_type=opts.guidance_type, guidance_rate=opts.guidance_rate,
                        prompt=opts.prompt, use_fp16=opts.use_fp16)
    return model, device


def solver_options(opts, solver, solver_tea=None):
    """The solver's resolved options (--max_order); with a GITS teacher, (student, teacher)
    options as sample.py resolves them (gits.search_options)."""
    flags = dict(max_order=opts.max_order)
    try:
        solver_utils.check_compat(opts.compat)
        if solver_tea is not None:
            return gits.search_options(solver, solver_tea, flags, opts.compat, opts.num_steps_tea)
        failure = solvers.official_max_order_failure(solver, flags, opts.compat)
        if failure:
            raise ValueError(failure)
        return solvers.resolve_options(solver, flags, opts.compat)
    except ValueError as e:
        raise UserError(str(e)) from None


def outdir_for(opts, command, record_name):
    """The output folder (default trajectories/<dataset_name>/<command>, so that the two commands
    never share one), created. A folder whose `record_name` (the command's JSON) another
    configuration wrote is refused: the figures beside it are that run's."""
    outdir = opts.outdir or os.path.join('trajectories', opts.dataset_name, command)
    dnnlib.util.check_writable_dir(outdir)
    check_outputs(outdir, record_name, command_line(opts))
    os.makedirs(outdir, exist_ok=True)
    return outdir


def command_line(opts):
    """The flags that determine a command's outputs (all but where they go and the device), as
    its JSON records them."""
    return json.loads(json.dumps({k: v for k, v in opts._asdict().items() if k not in ('outdir', 'device')}))


def check_outputs(outdir, record_name, ours):
    """UserError unless `outdir` holds no `record_name`, or one written with the same flags (a
    rerun replaces its own outputs)."""
    path = os.path.join(outdir, record_name)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            theirs = json.load(f).get('options')
    except (OSError, ValueError, AttributeError):
        theirs = None
    if theirs != ours:
        differ = sorted(k for k in ours if not isinstance(theirs, dict) or theirs.get(k) != ours[k])
        what = f'it differs in {", ".join("--" + k for k in differ)}' if isinstance(theirs, dict) else 'unknown flags'
        raise UserError(f'--outdir: "{outdir}" holds the {record_name} of another run ({what}); pass another --outdir '
                        'or remove the folder')


def model_options(fn):
    for option in reversed([
        click.option('--dataset_name', type=str, required=True, help='Model: ' + ', '.join(models.REGISTRY)),
        click.option('--model_path', type=str, default=None, help='Local file or URL instead of the default download'),
        click.option('--device', type=str, default=None, help='torch device [default: cuda if available, else cpu]'),
        click.option('--use_fp16', type=BOOL, default=None, help='Half precision where supported [default: on for CUDA]'),
        click.option('--guidance_type', type=click.Choice(list(models.GUIDANCE_TYPES)), default=None, help='cg, cfg or uncond'),
        click.option('--guidance_rate', type=float, default=None, help='Guidance scale'),
        click.option('--prompt', type=str, default=None, help='Prompt for Stable Diffusion'),
        click.option('--outdir', type=str, default=None, help='Output folder [default: ./trajectories/<dataset_name>/<command>]'),
        click.option('--max_order', type=int, default=None, help='Order of multistep solvers'),
        click.option('--compat', type=str, default=None, help='gits-main: the official GITS code\'s solvers, schedules and search'),
    ]):
        fn = option(fn)
    return fn


@click.group()
def main():
    """Trajectory regularity analysis and schedule plots."""


# ----------------------------------------------------------------------------------------------

def trajectory_schedule(opts, model, options):
    """The recorded points: --t_steps, or --num_steps of --schedule_type over the model's range."""
    try:
        if opts.t_steps is not None:
            t_steps = torch.tensor(cli_options.parse_t_steps(opts.t_steps, opts.compat), dtype=torch.float64)
        else:
            t_steps = solver_utils.get_schedule(opts.num_steps, model.sigma_min, model.sigma_max,
                                                opts.schedule_type, opts.schedule_rho, model=model, compat=opts.compat)
        solvers.resolve_options(opts.solver, options, opts.compat, num_points=len(t_steps))
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(t_steps) < 3:
        raise UserError('--t_steps: a trajectory needs at least 3 points')
    return t_steps


def record_seeds(opts, model, device, seeds, t_steps, options):
    """Sampling and denoising trajectories [N, B, D] of every seed, batch by batch, with a progress
    bar of denoiser evaluations."""
    xs, dens = [], []
    per_seed = solvers.count_nfe(opts.solver, len(t_steps), compat=opts.compat, **options) + 1   # + D at the end
    with run_schedule.progress(len(seeds) * per_seed, 'Trajectories') as bar:
        for i in range(0, len(seeds), opts.batch):
            noise, denoise = seed_batch(model, seeds[i:i + opts.batch], device)
            x, d = record_trajectories(run_schedule.counting(denoise, bar), noise, t_steps, opts.solver,
                                       compat=opts.compat, **options)
            xs.append(x.flatten(2))
            dens.append(d.flatten(2))
    return torch.cat(xs, 1), torch.cat(dens, 1)


def recording_options(min_points, seeds_help='Trajectories to record, e.g. 0-15'):
    """The flags of a command that records trajectories (analyze, geometry)."""
    def decorate(fn):
        for option in reversed([
            click.option('--seeds', type=str, default='0-15', help=seeds_help),
            click.option('--batch', type=click.IntRange(min=1), default=64, help='Trajectories per batch'),
            click.option('--solver', type=click.Choice(list(solvers.SOLVERS)), default='ipndm', help='Solver that traces the trajectory'),
            click.option('--num_steps', type=click.IntRange(min=min_points), default=61, help='Points on each trajectory'),
            click.option('--schedule_type', type=click.Choice(list(solver_utils.SCHEDULES)), default='polynomial', help='Time schedule'),
            click.option('--schedule_rho', type=float, default=7.0, help='Schedule exponent'),
            click.option('--t_steps', type=str, default=None, help='Explicit schedule, e.g. [80,...,0.002]'),
        ]):
            fn = option(fn)
        return model_options(fn)
    return decorate


def recording_flags(name, kwargs):
    """The frozen flags of a recording command, the inapplicable ones refused, and its seeds."""
    opts = cli_options.frozen(name, kwargs)
    dnnlib.util.refuse_inapplicable(opts, dnnlib.util.explicit_flags(click.get_current_context()),
                                    cli_options.SCHEDULE_RULES)
    try:
        return opts, misc.parse_int_list(opts.seeds)
    except ValueError as e:
        raise UserError(f'--seeds: {e}') from None


@main.command()
@recording_options(min_points=3)
@click.option('--num_plots', type=click.IntRange(min=1), default=4, help='Trajectories drawn in the 3-D figure')
def analyze(**kwargs):
    """Record trajectories and measure their deviation from a straight line."""
    opts, seeds = recording_flags('Analyze', kwargs)
    options = solver_options(opts, opts.solver)
    model, device = load_model(opts)
    t_steps = trajectory_schedule(opts, model, options)
    outdir = outdir_for(opts, 'analyze', 'trajectory.json')
    run_schedule.warn_outside_model_range(t_steps, model)

    xs, dens = record_seeds(opts, model, device, seeds, t_steps, options)
    basis, shares = projection_basis(xs)
    result = dict(dataset_name=opts.dataset_name, solver=opts.solver, solver_options=options, compat=opts.compat, seeds=seeds,
                  t_steps=[float(t) for t in t_steps], t_steps_text=solver_utils.format_t_steps(t_steps),
                  sampling=dict(profile_stats(xs), top2_deviation_share=shares),
                  denoising=profile_stats(dens), options=command_line(opts))
    title = f'{opts.dataset_name}: {len(seeds)} trajectories, {opts.solver}, {len(t_steps)} points'
    plot_profiles(os.path.join(outdir, 'profile.png'), t_steps, line_deviation(xs), line_deviation(dens), title)
    plot_3d(os.path.join(outdir, 'traj_3d.png'), xs, dens, basis, title, opts.num_plots)
    misc.atomic_write_json(os.path.join(outdir, 'trajectory.json'), result)
    rel = torch.tensor(result['sampling']['max_relative'])
    print(f'{len(seeds)} trajectories of {len(t_steps)} points: max deviation / start-end distance '
          f'{rel.mean():.4f} on average (min {rel.min():.4f}, max {rel.max():.4f}); '
          f'2 directions carry {np.mean(shares):.3f} of the deviation')
    print(f'Wrote profile.png, traj_3d.png and trajectory.json to {outdir}')


# ----------------------------------------------------------------------------------------------
# Curvature, torsion and calibrated projections (issue 30, items 1 and 2).

def _finite(values):
    """A list for the JSON with NaN (no value: a point left out of the fit) as null."""
    return [None if v != v else v for v in values]


def quartiles(rows):
    """Per point, the 25th, 50th and 75th percentiles over trajectories of rows [B, N] (NaN
    ignored), as lists."""
    q = torch.nanquantile(rows, torch.tensor([0.25, 0.5, 0.75], dtype=rows.dtype), dim=0)
    return dict(q25=_finite(q[0].tolist()), median=_finite(q[1].tolist()), q75=_finite(q[2].tolist()))


def curve_stats(points, window):
    """Frenet-Serret geometry of each trajectory of points [N, B, D], projected onto its own 3-D
    chord frame: kappa(s) and tau(s) per seed, and their quartiles over seeds, in units of the
    projected curve's length L (scale-free: kappa L = pi for a half circle), with the share of
    the total rotation reached at each point and of the arc length."""
    g = geometry.trajectory_geometry(points, window)
    length = g['s'][:, -1:].clamp_min(1e-300)
    total = g['rotation'][:, -1:]
    rot_frac = torch.where(total > 0, g['rotation'] / total.clamp_min(1e-300), torch.full_like(g['rotation'], float('nan')))
    stats = dict(kappa=[_finite(r) for r in g['kappa'].tolist()], tau=[_finite(r) for r in g['tau'].tolist()],
                 arc_length=g['s'].tolist(), rotation=g['rotation'].tolist(), total_rotation=total[:, 0].tolist(),
                 kappa_L=quartiles(g['kappa'] * length), abs_tau_L=quartiles(g['tau'].abs() * length),
                 rotation_fraction=quartiles(rot_frac), arc_fraction=quartiles(g['s'] / length),
                 mean_rotation=g['rotation'].mean(0).tolist())
    return g, stats


def calibrated(points, reference=0):
    """Each trajectory in its own chord frame, 2-D (the chord and one deviation direction) and 3-D
    (two), aligned to trajectory `reference` by orthogonal Procrustes. Returns ({dims: aligned
    coordinates [N, B, dims]}, stats): per dims, the share of each trajectory's deviation from its
    chord that its dims - 1 directions carry, and the RMS distance to the reference after alignment
    over the one before (both per seed), and that distance relative to the reference's chord."""
    aligned, stats = {}, {}
    for dims in (2, 3):
        coords, shares = geometry.chord_coordinates(points, dims)
        aligned[dims], residual = geometry.align_to_reference(coords, reference)
        chord = float(coords[-1, reference].norm())
        rms = (aligned[dims] - aligned[dims][:, reference:reference + 1]).square().sum(-1).mean(0).sqrt()
        stats[f'{dims}d'] = dict(deviation_share=shares, residual_ratio=residual,
                                 aligned_rms_over_chord=(rms / chord).tolist(),
                                 median_deviation_share=float(np.median(shares)),
                                 median_residual_ratio=float(np.median(residual)))
    return aligned, stats


def _band(ax, x, q, color, label):
    med = np.asarray([np.nan if v is None else v for v in q['median']], dtype=float)
    lo = np.asarray([np.nan if v is None else v for v in q['q25']], dtype=float)
    hi = np.asarray([np.nan if v is None else v for v in q['q75']], dtype=float)
    ax.plot(x, med, color=color, lw=2, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.25, lw=0)


def plot_curvature(path, t_steps, stats, title):
    """Median and quartiles over seeds of kappa L and |tau| L against sigma, for the sampling and
    the denoising trajectory."""
    plt = _pyplot()
    t = np.asarray([float(v) for v in t_steps])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, name in [(axes[0], 'kappa_L', r'curvature $\kappa L$'), (axes[1], 'abs_tau_L', r'torsion $|\tau| L$')]:
        for which, color in (('sampling', 'tab:blue'), ('denoising', 'tab:orange')):
            _band(ax, t, stats[which][key], color, f'{which} (median, quartiles)')
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.invert_xaxis()
        ax.set_xlabel(r'noise level $\sigma$ (sampling goes left to right)')
        ax.set_title(name + ' of the 3-D projection (L: its length)', fontsize=9)
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_rotation(path, t_steps, stats, title):
    """Where the rotation concentrates: the share of the total rotation (and of the arc length)
    reached by each noise level, median and quartiles over seeds."""
    plt = _pyplot()
    t = np.asarray([float(v) for v in t_steps])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, which in zip(axes, ('sampling', 'denoising')):
        _band(ax, t, stats[which]['rotation_fraction'], 'tab:red', r'total rotation $\int\sqrt{\kappa^2+\tau^2}\,ds$')
        _band(ax, t, stats[which]['arc_fraction'], 'tab:gray', 'arc length $s$')
        ax.set_xscale('log')
        ax.invert_xaxis()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(r'noise level $\sigma$ (sampling goes left to right)')
        ax.set_ylabel('share reached (median, quartiles)')
        ax.set_title(f'{which} trajectory', fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='upper left')
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_procrustes(path, aligned, aligned_den, reference, title):
    """Sampling trajectories aligned to the reference by Procrustes in 2-D and 3-D, and the
    denoising ones in 2-D."""
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 3.8))
    panels = [(aligned[2], 'sampling, 2-D', 'tab:blue'), (aligned[3], 'sampling, 3-D', 'tab:blue'),
              (aligned_den[2], 'denoising, 2-D', 'tab:orange')]
    for i, (coords, name, color) in enumerate(panels):
        c = coords.numpy()
        ax = fig.add_subplot(1, 3, i + 1, projection='3d' if c.shape[-1] == 3 else None)
        for b in range(c.shape[1]):
            ref = b == reference
            ax.plot(*[c[:, b, k] for k in range(c.shape[-1])], color='black' if ref else color,
                    lw=1.6 if ref else 0.7, alpha=1.0 if ref else 0.35)
        ax.set_xlabel('start-end', fontsize=8)
        ax.set_ylabel('dev. dir. 1', fontsize=8)
        if c.shape[-1] == 3:
            ax.set_zlabel('dev. dir. 2', fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_title(f'{name} (black: the reference)', fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.3)
    _save(fig, path, dpi=80)        # many thin lines: a small PNG needs fewer pixels
    plt.close(fig)


@main.command(name='geometry')
@recording_options(min_points=5, seeds_help='Trajectories to record, e.g. 0-15 (the first is the Procrustes reference)')
@click.option('--window', type=click.IntRange(min=4), default=7, help='Points of the local cubic fit in arc length')
def geometry_command(**kwargs):
    """Curvature and torsion of the projected trajectories, and their Procrustes alignment."""
    opts, seeds = recording_flags('Geometry', kwargs)
    if len(seeds) < 2:
        raise UserError('--seeds: quartiles and an alignment need at least 2 trajectories')
    options = solver_options(opts, opts.solver)
    model, device = load_model(opts)
    t_steps = trajectory_schedule(opts, model, options)
    if len(t_steps) < opts.window:
        raise UserError(f'--window: {opts.window} points do not fit on a trajectory of {len(t_steps)} points')
    outdir = outdir_for(opts, 'geometry', 'geometry.json')
    run_schedule.warn_outside_model_range(t_steps, model)

    xs, dens = record_seeds(opts, model, device, seeds, t_steps, options)
    sampling, s_stats = curve_stats(xs, opts.window)
    _, d_stats = curve_stats(dens, opts.window)
    aligned, s_align = calibrated(xs)
    aligned_den, d_align = calibrated(dens)
    result = dict(dataset_name=opts.dataset_name, solver=opts.solver, solver_options=options, compat=opts.compat,
                  seeds=seeds, reference_seed=seeds[0], window=opts.window,
                  t_steps=[float(t) for t in t_steps], t_steps_text=solver_utils.format_t_steps(t_steps),
                  sampling=dict(s_stats, procrustes=s_align), denoising=dict(d_stats, procrustes=d_align),
                  options=command_line(opts))
    title = f'{opts.dataset_name}: {len(seeds)} trajectories, {opts.solver}, {len(t_steps)} points, window {opts.window}'
    stats = dict(sampling=s_stats, denoising=d_stats)
    plot_curvature(os.path.join(outdir, 'curvature.png'), t_steps, stats, title)
    plot_rotation(os.path.join(outdir, 'rotation.png'), t_steps, stats, title)
    plot_procrustes(os.path.join(outdir, 'procrustes.png'), aligned, aligned_den, 0, title)
    misc.atomic_write_json(os.path.join(outdir, 'geometry.json'), result)
    reached = np.asarray([np.nan if v is None else v for v in s_stats['rotation_fraction']['median']])
    half = float(t_steps[int(np.argmax(reached >= 0.5))])     # the first point with half the rotation
    print(f'{len(seeds)} trajectories of {len(t_steps)} points: total rotation of the sampling trajectory '
          f'{np.median(s_stats["total_rotation"]):.3f} rad (median), half of it reached at sigma {half:.3g}; '
          f'deviation carried by 1 / 2 directions {s_align["2d"]["median_deviation_share"]:.3f} / '
          f'{s_align["3d"]["median_deviation_share"]:.3f}; Procrustes residual (3-D) '
          f'{s_align["3d"]["median_residual_ratio"]:.3f} of the unaligned distance')
    print(f'Wrote curvature.png, rotation.png, procrustes.png and geometry.json to {outdir}')


# ----------------------------------------------------------------------------------------------

def schedule_errors(model, table, solver, options, seeds, device, afs=False, compat=None):
    """RMSE of `solver` on each schedule of `table` against the analytic model's exact ODE
    solution from the same start, per seed and then the mean over seeds (one exact solve per pair
    of end points: our schedules share them; the official float32 ones, --compat, differ in the
    last digits)."""
    noise, denoise = seed_batch(model, seeds, device)
    exact = {}
    errors = {}
    with torch.no_grad():
        for name, schedule in table.items():
            ends = (float(schedule[0]), float(schedule[-1]))
            if ends not in exact:
                exact[ends] = model.exact(noise * ends[0], *ends).double()
            out = solvers.SOLVERS[solver](denoise, noise * ends[0], schedule, afs=afs, compat=compat, **options)
            errors[name] = float(misc.per_seed_rmse(out, exact[ends]).mean())
    return errors


def compared_schedules(opts, model, device, teacher_options):
    """The compared schedules as the paper runs them: polynomial with rho (EDM's 7), logsnr, and
    time_uniform uniform in VP time (rho = 1); GITS searches on a polynomial teacher grid (with a
    progress bar of its denoiser evaluations)."""
    fixed = dict(polynomial=opts.schedule_rho, logsnr=7.0, time_uniform=1.0)
    table = {kind: solver_utils.get_schedule(opts.num_steps, model.sigma_min, model.sigma_max, kind, rho,
                                             compat=opts.compat) for kind, rho in fixed.items()}
    warm = list(range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup))
    noise, denoise = seed_batch(model, warm, device, warmup=True)
    teacher_evals = len(warm) * solvers.count_nfe(opts.solver_tea, opts.num_steps_tea, compat=opts.compat,
                                                  **teacher_options)
    try:
        with run_schedule.progress(teacher_evals, 'GITS search') as bar:
            table['gits'] = gits.search_schedule(
                run_schedule.counting(denoise, bar), noise, num_steps=opts.num_steps, sigma_min=model.sigma_min,
                sigma_max=model.sigma_max, schedule_type='polynomial', schedule_rho=opts.schedule_rho,
                solver_tea=opts.solver_tea, num_steps_tea=opts.num_steps_tea, metric=opts.metric, coeff=opts.coeff,
                afs=bool(opts.afs), solver=opts.solver, model=model, batch_size=64, compat=opts.compat,
                max_order=opts.max_order)
    except ValueError as e:
        raise UserError(str(e)) from None
    return table


@main.command()
@model_options
@click.option('--solver', type=click.Choice(list(solvers.SOLVERS)), default='ipndm', help='Student solver')
@click.option('--num_steps', type=click.IntRange(min=2), default=7, help='Number of time points')
@click.option('--schedule_rho', type=float, default=7.0, help='Exponent of polynomial (rho) and GITS base schedule')
@click.option('--afs', type=BOOL, default=False, help='GITS with afs (a free extra step)')
@click.option('--num_warmup', type=click.IntRange(min=1), default=gits.NUM_WARMUP, help='GITS warm-up trajectories')
@click.option('--solver_tea', type=click.Choice(list(solvers.SOLVERS)), default=gits.SOLVER_TEA, help='GITS teacher solver')
@click.option('--num_steps_tea', type=click.IntRange(min=3), default=gits.NUM_STEPS_TEA, help='GITS teacher time points')
@click.option('--coeff', type=float, default=gits.COEFF, help='GITS DP coefficient')
@click.option('--metric', type=click.Choice(list(gits.METRICS)), default=gits.METRIC, help='GITS cost metric')
@click.option('--warmup_seed', type=click.IntRange(min=0), default=gits.WARMUP_SEED, help='First seed of the warm-up noise')
@click.option('--error_seeds', type=str, default=None, help='Analytic models: seeds on which to measure each schedule\'s error, e.g. 0-15')
def schedules(**kwargs):
    """Compare polynomial, logsnr, time_uniform and GITS schedules for one model and NFE."""
    opts = cli_options.frozen('Schedules', kwargs)
    options, teacher_options = solver_options(opts, opts.solver, opts.solver_tea)
    if opts.num_steps_tea < opts.num_steps:
        raise UserError(f'--num_steps_tea: must be at least --num_steps ({opts.num_steps})')
    if not opts.coeff > 0:
        raise UserError(f'--coeff: must be positive (got {opts.coeff})')
    error_seeds = None
    if opts.error_seeds:
        try:
            error_seeds = misc.parse_int_list(opts.error_seeds)
        except ValueError as e:
            raise UserError(f'--error_seeds: {e}') from None
    model, device = load_model(opts)
    if error_seeds and not hasattr(model, 'exact'):
        raise UserError(f'--error_seeds: only the analytic models ({", ".join(models.ANALYTIC)}) have an exact solution')
    outdir = outdir_for(opts, 'schedules', 'schedules.json')

    table = compared_schedules(opts, model, device, teacher_options)
    afs = bool(opts.afs)   # without GITS afs saves one evaluation; with GITS it buys a free extra step
    nfe = {k: solvers.count_nfe(opts.solver, len(v), afs=afs, compat=opts.compat, **options) for k, v in table.items()}
    errors = None
    if error_seeds:
        try:
            for v in table.values():
                solvers.resolve_options(opts.solver, options, opts.compat, num_points=len(v))
        except ValueError as e:
            raise UserError(str(e)) from None
        errors = schedule_errors(model, table, opts.solver, options, error_seeds, device, afs, opts.compat)
    result = dict(dataset_name=opts.dataset_name, solver=opts.solver, solver_options=options, afs=afs,
                  compat=opts.compat, teacher_options=teacher_options,
                  num_steps=opts.num_steps, nfe=nfe, num_warmup=opts.num_warmup, num_steps_tea=opts.num_steps_tea,
                  solver_tea=opts.solver_tea, coeff=opts.coeff, metric=opts.metric, warmup_seed=opts.warmup_seed,
                  schedules={k: [float(t) for t in v] for k, v in table.items()},
                  t_steps_text={k: solver_utils.format_t_steps(v) for k, v in table.items()},
                  errors=errors, error_seeds=error_seeds, options=command_line(opts))
    names = dict(polynomial=f'polynomial (rho={opts.schedule_rho:g})', logsnr='logsnr',
                 time_uniform='time_uniform (rho=1)', gits=f'gits (dp, coeff={opts.coeff:g})')
    labels = {names[k]: v for k, v in table.items()}
    nfe_text = ', '.join(sorted({str(v) for v in nfe.values()}))
    title = f'{opts.dataset_name}: {opts.solver}, NFE {nfe_text}' + (' (afs)' if afs else '')
    plot_schedules(os.path.join(outdir, 'schedules.png'), labels, title,
                   {names[k]: v for k, v in errors.items()} if errors else None)
    misc.atomic_write_json(os.path.join(outdir, 'schedules.json'), result)
    for k, v in table.items():
        err = f'  RMSE {errors[k]:.4f}' if errors else ''
        print(f'{k:>13s} NFE={nfe[k]}: --t_steps={solver_utils.format_t_steps(v)}{err}')
    print(f'Wrote schedules.png and schedules.json to {outdir}')


# ----------------------------------------------------------------------------------------------
# Statistics over many seeds (`stats`). Per seed, Q scalars at each of the N points.

STATISTICS = {    # name -> label; seed_statistics gives them in this order
    'norm_x': r'$\|x_t\|$',
    'norm_denoised': r'$\|D(x_t; t)\|$',
    'norm_noise_estimate': r'$\|(x_t - D(x_t; t)) / t\|$',
    'chord_distance_sampling': r'sampling trajectory: distance from its chord',
    'chord_distance_denoising': r'denoising trajectory: distance from its chord',
    'cosine_noise_estimate': r'cosine of $(x_t - D) / t$ and $x_t - x_0$',
}


def seed_statistics(xs, dens, t_steps):
    """[B, Q, N] for trajectories xs, dens [N, B, D] (STATISTICS order). x_0 is the sampling
    trajectory's last point, where the cosine is undefined (NaN)."""
    t = torch.tensor([float(v) for v in t_steps], dtype=torch.float64)[:, None, None]
    eps = (xs - dens) / t
    to_end = xs - xs[-1]
    cosine = (eps * to_end).sum(-1) / (eps.norm(dim=-1) * to_end.norm(dim=-1))
    cosine[-1] = float('nan')
    rows = [xs.norm(dim=-1), dens.norm(dim=-1), eps.norm(dim=-1), line_deviation(xs), line_deviation(dens), cosine]
    return torch.stack(rows).permute(2, 0, 1)


def write_per_seed(path, names, seeds, values):
    """per_seed.npz: `values` [S, Q, N] as one array per name [S, N], and the seeds."""
    import io
    buf = io.BytesIO()
    np.savez(buf, seeds=np.asarray(seeds, dtype=np.int64), **{n: values[:, q].numpy() for q, n in enumerate(names)})
    misc.atomic_write_bytes(path, buf.getvalue())


def plot_bands(path, t_steps, panels, title, ncols=3):
    """One panel per (label, [S, N] values, log y): the median over seeds and the 25-75 % and
    5-95 % bands against sigma."""
    plt = _pyplot()
    t = np.asarray([float(v) for v in t_steps])
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (label, values, log_y) in zip(axes.flat, panels):
        v = np.asarray(values)
        ok = ~np.isnan(v).any(0)
        q = np.quantile(v[:, ok], trajectory_stats.QUANTILES, axis=0)     # 5, 25, 50, 75, 95 %
        ax.fill_between(t[ok], q[0], q[4], color='tab:blue', alpha=0.15, lw=0, label='5-95 %')
        ax.fill_between(t[ok], q[1], q[3], color='tab:blue', alpha=0.35, lw=0, label='25-75 %')
        ax.plot(t[ok], q[2], color='tab:blue', lw=1.8, label=f'median of {v.shape[0]}')
        ax.set_xscale('log')
        if log_y:
            ax.set_yscale('log')
        ax.invert_xaxis()
        ax.set_xlabel(r'$\sigma$ (sampling goes left to right)', fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def parse_seeds(text, flag='--seeds'):
    try:
        return misc.parse_int_list(text)
    except ValueError as e:
        raise UserError(f'{flag}: {e}') from None


def trajectory_options(fn):
    """The flags that say how trajectories are traced: seeds, batch, solver and schedule."""
    for option in reversed([
        click.option('--seeds', type=str, default='0-63', help='Seeds of the trajectories, e.g. 0-49999'),
        click.option('--batch', type=click.IntRange(min=1), default=64, help='Trajectories per batch (all processes)'),
        click.option('--solver', type=click.Choice(list(solvers.SOLVERS)), default='ipndm', help='Solver that traces the trajectories'),
        click.option('--num_steps', type=click.IntRange(min=3), default=61, help='Points on each trajectory'),
        click.option('--schedule_type', type=click.Choice(list(solver_utils.SCHEDULES)), default='polynomial', help='Time schedule'),
        click.option('--schedule_rho', type=float, default=7.0, help='Schedule exponent'),
        click.option('--t_steps', type=str, default=None, help='Explicit schedule, e.g. [80,...,0.002]'),
    ]):
        fn = option(fn)
    return fn


def prepare_run(kwargs, name):
    """The options, the model, its device, the seeds, the solver's options and the schedule of a
    torchrun-aware command, and its output folder (checked and created on rank 0), or a UserError
    on every process."""
    opts = cli_options.frozen(name, kwargs)
    dnnlib.util.refuse_inapplicable(opts, dnnlib.util.explicit_flags(click.get_current_context()),
                                    cli_options.SCHEDULE_RULES)
    seeds = parse_seeds(opts.seeds)
    options = solver_options(opts, opts.solver)
    dist.init(opts.device)
    model, device = load_model(opts)
    t_steps = trajectory_schedule(opts, model, options)
    return opts, model, device, seeds, options, t_steps


def traced(opts, options, t_steps):
    """record_trajectories(denoise, noise) with the command's solver and schedule, flattened to
    [N, B, D]."""
    def fn(denoise, noise):
        xs, dens = record_trajectories(denoise, noise, t_steps, opts.solver, compat=opts.compat, **options)
        return xs.flatten(2), dens.flatten(2)
    return fn


@main.command()
@model_options
@trajectory_options
def stats(**kwargs):
    """Statistics of many seeds' trajectories per noise level (torchrun-aware, streamed)."""
    opts, model, device, seeds, options, t_steps = prepare_run(kwargs, 'Stats')
    outdir = dist.on_rank0(lambda: outdir_for(opts, 'stats', 'stats.json'))
    run_schedule.warn_outside_model_range(t_steps, model)
    trace = traced(opts, options, t_steps)
    per_seed = solvers.count_nfe(opts.solver, len(t_steps), compat=opts.compat, **options) + 1   # + D at the end
    values = trajectory_stats.measure_seeds(model, seeds, opts.batch, device,
                                            lambda denoise, noise: seed_statistics(*trace(denoise, noise), t_steps),
                                            per_seed)
    if dist.get_rank() == 0:
        names = list(STATISTICS)
        result = dict(dataset_name=opts.dataset_name, solver=opts.solver, solver_options=options, compat=opts.compat,
                      num_seeds=len(seeds), t_steps=[float(t) for t in t_steps],
                      t_steps_text=solver_utils.format_t_steps(t_steps), quantiles=list(trajectory_stats.QUANTILES),
                      statistics={n: trajectory_stats.summarize(values[:, q]) for q, n in enumerate(names)},
                      options=command_line(opts))
        title = f'{opts.dataset_name}: {len(seeds)} trajectories, {opts.solver}, {len(t_steps)} points'
        plot_bands(os.path.join(outdir, 'stats.png'), t_steps,
                   [(STATISTICS[n], values[:, q].numpy(), q < 3) for q, n in enumerate(names)], title)
        write_per_seed(os.path.join(outdir, 'per_seed.npz'), names, seeds, values)
        misc.atomic_write_json(os.path.join(outdir, 'stats.json'), result)
        cos = np.asarray(values[:, -1, :-1])
        print(f'{len(seeds)} trajectories of {len(t_steps)} points: median cosine of the noise estimate and x_t - x_0 '
              f'{np.median(cos):.4f} (5 % quantile {np.quantile(cos, 0.05):.4f})')
        print(f'Wrote stats.png, stats.json and per_seed.npz to {outdir}')
    dist.barrier()
    dist.shutdown()


# ----------------------------------------------------------------------------------------------
# Data sets, the optimal denoiser and analytic scores (`dataset`, `optimal`).

@main.command()
@click.option('--dataset_name', type=str, required=True, help='Analytic model: ' + ', '.join(empirical.DATASETS))
@click.option('--dest', type=str, required=True, help='Output zip (dataset_tool\'s layout, labels in dataset.json)')
@click.option('--num', type=click.IntRange(min=2), default=2000, help='Images drawn (the mixtures; digits writes its own set)')
@click.option('--seed', type=click.IntRange(min=0), default=0, help='Seed of the draw')
def dataset(dataset_name, dest, num, seed):
    """Write an analytic model's data set as a zip of PNGs, for `optimal --data`."""
    if dataset_name not in empirical.DATASETS:
        raise UserError(f'--dataset_name: "{dataset_name}" has no built-in data set; choose one of '
                        f'{", ".join(empirical.DATASETS)}')
    draw, takes_num = empirical.DATASETS[dataset_name]
    if not takes_num and 'num' in dnnlib.util.explicit_flags(click.get_current_context()):
        raise UserError(f'--num: "{dataset_name}" writes its whole data set; drop the flag')
    dnnlib.util.check_writable_file(dest, '--dest')
    images, labels = draw(models.load(dataset_name), num, seed)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    misc.atomic_write_bytes(dest, empirical.dataset_zip(images, labels))
    print(f'Wrote {images.shape[0]} images with labels to {dest}')


def load_data(opts, model):
    """The --data set in the model's shape, and its labels (or None)."""
    if model.latent_space:
        raise UserError(f'--data: "{opts.dataset_name}" samples in latent space; a data set of images does not '
                        'give its denoiser')
    data, labels = empirical.read_dataset(opts.data, model.shape)
    if data.shape[0] < 2:
        raise UserError(f'--data: "{opts.data}" holds {data.shape[0]} image; fits need at least 2')
    return data, labels


def analytic_kinds(opts, data, labels):
    """The --analytic list, checked against the data set."""
    kinds = [k for k in opts.analytic.split(',') if k] if opts.analytic != 'none' else []
    bad = [k for k in kinds if k not in empirical.ANALYTIC_FITS]
    if bad or len(set(kinds)) != len(kinds):
        raise UserError(f'--analytic: "{opts.analytic}" is not a list of distinct names among '
                        f'{", ".join(empirical.ANALYTIC_FITS)} (or none)')
    if 'mixture' in kinds and labels is None:
        raise UserError(f'--analytic: mixture needs class labels and "{opts.data}" has none (no labels in a '
                        'dataset.json); leave mixture out')
    dim = data[0].numel()
    if 'lowrank' in kinds and not 1 <= opts.rank < dim:
        raise UserError(f'--rank: must be in 1..{dim - 1} for data of dimension {dim} (got {opts.rank})')
    return kinds


def point_rmse(a, b):
    """RMSE [N, B] of trajectories a, b [N, B, D] at every point."""
    return (a - b).square().mean(-1).sqrt()


def plot_gaps(path, t_steps, values, names, title):
    """Left: each fitted denoiser's trajectory against the model's from the same noise; right:
    the fitted denoisers against the model's denoiser on the model's own states. Mean over seeds
    (line) and the 25-75 % band, against sigma."""
    plt = _pyplot()
    t = np.asarray([float(v) for v in t_steps])
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    k = len(names)
    for ax, offset, ylabel in [(axes[0], 0, 'RMSE of $x_t$ vs. the model\'s trajectory'),
                               (axes[1], k, r'RMSE of $D(x_t)$ vs. $D_{model}(x_t)$ on the model\'s $x_t$')]:
        for i, name in enumerate(names):
            v = values[:, offset + i].numpy()
            ok = (v > 0).all(0)               # log axis: not the common start, where trajectories agree
            ax.plot(t[ok], v[:, ok].mean(0), color=f'C{i}', lw=1.8, label=name)
            ax.fill_between(t[ok], np.quantile(v[:, ok], 0.25, 0), np.quantile(v[:, ok], 0.75, 0), color=f'C{i}',
                            alpha=0.2, lw=0)
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.invert_xaxis()
        ax.set_xlabel(r'$\sigma$ (sampling goes left to right)')
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_samples(path, model, rows, title):
    """One row of final samples per denoiser (its name on the left)."""
    plt = _pyplot()
    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(0.7 * n + 0.8, 0.75 * len(rows) + 0.4), squeeze=False)
    for r, (name, x) in enumerate(rows):
        images = (model.decode(x.to(model.device)).float().cpu().clamp(-1, 1) + 1) / 2
        for c in range(n):
            ax = axes[r, c]
            img = images[c].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap='gray', vmin=0, vmax=1, interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8, rotation=0, ha='right', va='center')
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


@main.command()
@model_options
@trajectory_options
@click.option('--data', type=str, required=True, help='Data set: a zip or folder of PNG/JPEG images (as fid.py ref reads it)')
@click.option('--analytic', type=str, default='gaussian,lowrank,mixture',
              help='Analytic scores fitted to --data: ' + ', '.join(empirical.ANALYTIC_FITS) + ' (comma list), or none')
@click.option('--rank', type=click.IntRange(min=1), default=16, help='Eigenvectors of the low-rank Gaussian')
@click.option('--num_plots', type=click.IntRange(min=1), default=8, help='Seeds in the samples figure')
def optimal(**kwargs):
    """The model against the optimal denoiser of a data set and analytic scores fitted to it."""
    opts, model, device, seeds, options, t_steps = prepare_run(kwargs, 'Optimal')
    if 'rank' in dnnlib.util.explicit_flags(click.get_current_context()) and 'lowrank' not in opts.analytic.split(','):
        raise UserError('--rank: needs lowrank in --analytic')
    data, labels = load_data(opts, model)
    kinds = analytic_kinds(opts, data, labels)
    outdir = dist.on_rank0(lambda: outdir_for(opts, 'optimal', 'optimal.json'))
    run_schedule.warn_outside_model_range(t_steps, model)
    fits = dict(optimal=empirical.KernelDenoiser(data, device=device))
    fits.update({k: empirical.fit_analytic(k, data, labels, opts.rank, device) for k in kinds})
    names = list(fits)
    trace = traced(opts, options, t_steps)

    def measure(denoise, noise):
        xs, dens = trace(denoise, noise)
        paths = [point_rmse(trace(fit.denoise, noise)[0], xs) for fit in fits.values()]
        on_model = [point_rmse(torch.stack([fit.denoise(x, float(t)) for x, t in zip(xs, t_steps)]), dens)
                    for fit in fits.values()]
        return torch.stack(paths + on_model).permute(2, 0, 1)              # [B, 2K, N]

    per_seed = solvers.count_nfe(opts.solver, len(t_steps), compat=opts.compat, **options) + 1
    values = trajectory_stats.measure_seeds(model, seeds, opts.batch, device, measure, per_seed)
    if dist.get_rank() == 0:
        columns = [f'trajectory_rmse_{n}' for n in names] + [f'denoiser_gap_{n}' for n in names]
        k = len(names)
        result = dict(dataset_name=opts.dataset_name, data_size=data.shape[0],
                      num_classes=None if labels is None else len(set(labels.tolist())),
                      solver=opts.solver, solver_options=options, compat=opts.compat, num_seeds=len(seeds),
                      t_steps=[float(t) for t in t_steps], t_steps_text=solver_utils.format_t_steps(t_steps),
                      quantiles=list(trajectory_stats.QUANTILES),
                      trajectory_rmse={n: trajectory_stats.summarize(values[:, i]) for i, n in enumerate(names)},
                      final_rmse={n: trajectory_stats.summarize(values[:, i, -1:]) for i, n in enumerate(names)},
                      denoiser_gap={n: trajectory_stats.summarize(values[:, k + i]) for i, n in enumerate(names)},
                      options=command_line(opts))
        title = f'{opts.dataset_name} vs. denoisers fitted to {data.shape[0]} images: {len(seeds)} seeds, {opts.solver}'
        plot_gaps(os.path.join(outdir, 'optimal.png'), t_steps, values, names, title)
        shown = seeds[:opts.num_plots]
        noise, denoise = seed_batch(model, shown, device)
        finals = [('model', record_trajectories(denoise, noise, t_steps, opts.solver, compat=opts.compat, **options)[0][-1])]
        finals += [(n, record_trajectories(fit.denoise, noise, t_steps, opts.solver, compat=opts.compat,
                                           **options)[0][-1]) for n, fit in fits.items()]
        plot_samples(os.path.join(outdir, 'samples.png'), model, finals, f'{opts.dataset_name}: seeds {shown[0]}.. from the same noise')
        write_per_seed(os.path.join(outdir, 'per_seed.npz'), columns, seeds, values)
        misc.atomic_write_json(os.path.join(outdir, 'optimal.json'), result)
        for n in names:
            print(f'{n:>9s}: final-point RMSE vs. the model {result["final_rmse"][n]["mean"][0]:.4g} (mean), '
                  f'denoiser gap on the model\'s states up to {max(result["denoiser_gap"][n]["mean"]):.4g}')
        print(f'Wrote optimal.png, samples.png, optimal.json and per_seed.npz to {outdir}')
    dist.barrier()
    dist.shutdown()


if __name__ == '__main__':
    dnnlib.run_cli(main)
