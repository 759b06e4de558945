"""Trajectory regularity of ODE-based diffusion sampling, and schedule comparisons.

    python trajectory.py analyze --dataset_name=digits --seeds=0-15
    python trajectory.py schedules --dataset_name=gmm --num_steps=7 --num_warmup=64

`analyze` records sampling trajectories x(t_i) of any model (a fine solver run with every
intermediate point kept) together with the denoising trajectory D(x(t_i); t_i), and measures
their shape: every point's distance from the straight line through the trajectory's first and
last points. Sampling trajectories deviate little and in a "boomerang" profile (zero at both
ends, one hump in between) whatever the content; denoising trajectories settle early. A 3-D
view uses the start-end direction plus the two directions that carry most of the deviation.
Outputs: profile.png, traj_3d.png and trajectory.json (every profile, per seed).

`schedules` draws the polynomial, logsnr and time_uniform schedules next to the GITS schedule
searched for the same model, solver and number of steps (schedules.png, schedules.json). For
the analytic models (gmm, gmm_wavelet, digits) it can also measure each schedule's true error.
"""

import os

import click
import numpy as np
import torch

import dnnlib
import gits
import models
import run_schedule
import solver_utils
import solvers
from dnnlib.util import UserError
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
# Geometry. Points are [N, B, D] float64: N points along each of B trajectories.

def line_deviation(points):
    """Distance of every point [N, B] from the straight line through the trajectory's first and
    last points. Zero at both ends by construction (up to round-off)."""
    rel = points - points[0]
    chord = rel[-1]
    u = chord / chord.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    along = (rel * u).sum(-1, keepdim=True)
    return (rel - along * u).norm(dim=-1)


def projection_basis(points):
    """Per trajectory, an orthonormal basis [B, 3, D]: the unit start-end direction, then the two
    leading singular directions of the deviation vectors (the component of x_i - x_0 orthogonal
    to the chord). Not centered: the deviations are anchored at zero at both ends, and these are
    the directions that reconstruct them best. Also returns the share of the deviation's squared
    norm those two directions carry [B] (1 = the trajectory lies in a 3-D subspace)."""
    rel = points - points[0]                                            # [N, B, D]
    chord = rel[-1]
    u = chord / chord.norm(dim=-1, keepdim=True).clamp_min(1e-300)      # [B, D]
    dev = rel - (rel * u).sum(-1, keepdim=True) * u
    bases, shares = [], []
    for b in range(points.shape[1]):
        _, s, vh = torch.linalg.svd(dev[:, b], full_matrices=False)   # vh [min(N, D), D]
        k = min(2, vh.shape[0])
        pcs = vh[:k]
        if k < 2:
            pcs = torch.cat([pcs, torch.zeros(2 - k, pcs.shape[1], dtype=pcs.dtype)])
        # Directions with a zero singular value are arbitrary and need not be orthogonal to u:
        # orthonormalise [u, pc1, pc2] (Householder QR stays orthonormal even when degenerate),
        # with signs that keep u and the leading directions as they were.
        q, r = torch.linalg.qr(torch.cat([u[b][None], pcs]).T)
        bases.append((q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)).T)
        total = s.square().sum()
        shares.append(float(s[:2].square().sum() / total) if total > 0 else 1.0)
    return torch.stack(bases), shares


def project(points, origin, basis):
    """Coordinates [N, B, 3] of points [N, B, D] relative to origin [B, D] in basis [B, 3, D]."""
    return torch.einsum('nbd,bkd->nbk', points - origin, basis)


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


def _save(fig, path):
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
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


def outdir_for(opts):
    outdir = opts.outdir or os.path.join('trajectories', opts.dataset_name)
    dnnlib.util.check_writable_dir(outdir)
    os.makedirs(outdir, exist_ok=True)
    return outdir


def model_options(fn):
    for option in reversed([
        click.option('--dataset_name', type=str, required=True, help='Model: ' + ', '.join(models.REGISTRY)),
        click.option('--model_path', type=str, default=None, help='Local file or URL instead of the default download'),
        click.option('--device', type=str, default=None, help='torch device [default: cuda if available, else cpu]'),
        click.option('--use_fp16', type=BOOL, default=None, help='Half precision where supported [default: on for CUDA]'),
        click.option('--guidance_type', type=click.Choice(list(models.GUIDANCE_TYPES)), default=None, help='cg, cfg or uncond'),
        click.option('--guidance_rate', type=float, default=None, help='Guidance scale'),
        click.option('--prompt', type=str, default=None, help='Prompt for Stable Diffusion'),
        click.option('--outdir', type=str, default=None, help='Output folder [default: ./trajectories/<dataset_name>]'),
        click.option('--max_order', type=int, default=None, help='Order of multistep solvers'),
        click.option('--compat', type=str, default=None, help='gits-main: the official GITS code\'s solvers, schedules and search'),
    ]):
        fn = option(fn)
    return fn


@click.group()
def main():
    """Trajectory regularity analysis and schedule plots."""


# ----------------------------------------------------------------------------------------------

@main.command()
@model_options
@click.option('--seeds', type=str, default='0-15', help='Trajectories to record, e.g. 0-15')
@click.option('--batch', type=click.IntRange(min=1), default=64, help='Trajectories per batch')
@click.option('--solver', type=click.Choice(list(solvers.SOLVERS)), default='ipndm', help='Solver that traces the trajectory')
@click.option('--num_steps', type=click.IntRange(min=3), default=61, help='Points on each trajectory')
@click.option('--schedule_type', type=click.Choice(list(solver_utils.SCHEDULES)), default='polynomial', help='Time schedule')
@click.option('--schedule_rho', type=float, default=7.0, help='Schedule exponent')
@click.option('--t_steps', type=str, default=None, help='Explicit schedule, e.g. [80,...,0.002]')
@click.option('--num_plots', type=click.IntRange(min=1), default=4, help='Trajectories drawn in the 3-D figure')
def analyze(**kwargs):
    """Record trajectories and measure their deviation from a straight line."""
    opts = dnnlib.EasyDict(kwargs)
    dnnlib.util.refuse_inapplicable(opts, dnnlib.util.explicit_flags(click.get_current_context()),
                                    run_schedule.SCHEDULE_RULES)
    try:
        seeds = misc.parse_int_list(opts.seeds)
    except ValueError as e:
        raise UserError(f'--seeds: {e}') from None
    options = solver_options(opts, opts.solver)
    model, device = load_model(opts)
    try:
        if opts.t_steps is not None:
            t_steps = torch.tensor(solver_utils.parse_t_steps(opts.t_steps), dtype=torch.float64)
            if opts.compat is not None:        # the official reads --t_steps into float32
                t_steps = torch.tensor(solver_utils.check_t_steps(t_steps.float().tolist()), dtype=torch.float64)
        else:
            t_steps = solver_utils.get_schedule(opts.num_steps, model.sigma_min, model.sigma_max,
                                                opts.schedule_type, opts.schedule_rho, model=model, compat=opts.compat)
        solvers.resolve_options(opts.solver, options, opts.compat, num_points=len(t_steps))
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(t_steps) < 3:
        raise UserError('--t_steps: a trajectory needs at least 3 points')
    outdir = outdir_for(opts)

    xs, dens = [], []
    for i in range(0, len(seeds), opts.batch):
        noise, denoise = seed_batch(model, seeds[i:i + opts.batch], device)
        x, d = record_trajectories(denoise, noise, t_steps, opts.solver, compat=opts.compat, **options)
        xs.append(x.flatten(2))
        dens.append(d.flatten(2))
    xs, dens = torch.cat(xs, 1), torch.cat(dens, 1)                    # [N, B, D]
    basis, shares = projection_basis(xs)
    result = dict(dataset_name=opts.dataset_name, solver=opts.solver, solver_options=options, compat=opts.compat, seeds=seeds,
                  t_steps=[float(t) for t in t_steps], t_steps_text=solver_utils.format_t_steps(t_steps),
                  sampling=dict(profile_stats(xs), top2_deviation_share=shares),
                  denoising=profile_stats(dens))
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


@main.command()
@model_options
@click.option('--solver', type=click.Choice(list(solvers.SOLVERS)), default='ipndm', help='Student solver')
@click.option('--num_steps', type=click.IntRange(min=2), default=7, help='Number of time points')
@click.option('--schedule_rho', type=float, default=7.0, help='Exponent of polynomial (rho) and GITS base schedule')
@click.option('--afs', type=BOOL, default=False, help='GITS with afs (a free extra step)')
@click.option('--num_warmup', type=click.IntRange(min=1), default=256, help='GITS warm-up trajectories')
@click.option('--solver_tea', type=click.Choice(list(solvers.SOLVERS)), default='ipndm', help='GITS teacher solver')
@click.option('--num_steps_tea', type=click.IntRange(min=3), default=61, help='GITS teacher time points')
@click.option('--coeff', type=float, default=1.15, help='GITS DP coefficient')
@click.option('--metric', type=click.Choice(['dev', 'l1', 'l2']), default='dev', help='GITS cost metric')
@click.option('--warmup_seed', type=click.IntRange(min=0), default=1_000_000_000, help='First seed of the warm-up noise')
@click.option('--error_seeds', type=str, default=None, help='Analytic models: seeds on which to measure each schedule\'s error, e.g. 0-15')
def schedules(**kwargs):
    """Compare polynomial, logsnr, time_uniform and GITS schedules for one model and NFE."""
    opts = dnnlib.EasyDict(kwargs)
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
    outdir = outdir_for(opts)

    # The compared schedules as the paper runs them: polynomial with rho (EDM's 7), logsnr, and
    # time_uniform uniform in VP time (rho = 1); GITS searches on a polynomial teacher grid.
    fixed = dict(polynomial=opts.schedule_rho, logsnr=7.0, time_uniform=1.0)
    table = {kind: solver_utils.get_schedule(opts.num_steps, model.sigma_min, model.sigma_max, kind, rho,
                                             compat=opts.compat) for kind, rho in fixed.items()}
    warm = list(range(opts.warmup_seed, opts.warmup_seed + opts.num_warmup))
    noise, denoise = seed_batch(model, warm, device, warmup=True)
    try:
        table['gits'] = gits.search_schedule(
            denoise, noise, num_steps=opts.num_steps, sigma_min=model.sigma_min, sigma_max=model.sigma_max,
            schedule_type='polynomial', schedule_rho=opts.schedule_rho, solver_tea=opts.solver_tea,
            num_steps_tea=opts.num_steps_tea, metric=opts.metric, coeff=opts.coeff, afs=bool(opts.afs),
            solver=opts.solver, model=model, batch_size=64, compat=opts.compat, max_order=opts.max_order)
    except ValueError as e:
        raise UserError(str(e)) from None
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
                  errors=errors, error_seeds=error_seeds)
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


if __name__ == '__main__':
    dnnlib.run_cli(main)
