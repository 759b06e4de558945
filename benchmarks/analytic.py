"""Pieces shared by the benchmarks that measure solvers against the analytic models' exact ODE
solutions (benchmarks/solvers.py, benchmarks/compat.py, benchmarks/gits.py, benchmarks/presets.py)."""

import math
import os
import time

import torch

import dnnlib
import render
import models
import solvers
from torch_utils import misc
from torch_utils.seeds import draw_seed_inputs



def parse_models_and_seeds(model_names, seeds):
    """--models and --seeds: the analytic model names and the seed list (UserError otherwise)."""
    names = [m for m in model_names.split(',') if m]
    for m in names:
        if m not in models.ANALYTIC:
            raise dnnlib.util.UserError(f'--models: "{m}" has no exact solution; choose among {", ".join(models.ANALYTIC)}')
    try:
        return names, misc.parse_int_list(seeds)
    except ValueError as e:
        raise dnnlib.util.UserError(f'--seeds: {e}') from None


def latents(model, seeds):
    """float64 latents at the model's sigma_max, drawn per seed as sample.py draws them."""
    return draw_seed_inputs(seeds, model.shape, 0)[0] * model.sigma_max


def paired(a, b):
    """Mean and standard error of the per-seed difference a - b: the seeds are shared, so this is
    far tighter than comparing two means with their own standard errors."""
    d = (a - b).to(torch.float64)
    return dict(diff=float(d.mean()), se=float(d.std() / math.sqrt(len(d))))


def num_points_for(solver, nfe, **count_options):
    """Smallest schedule length whose NFE (solvers.count_nfe with these options) is exactly
    `nfe`, or None."""
    for n in range(2, nfe + 3):
        if solvers.count_nfe(solver, n, **count_options) == nfe:
            return n
    return None


def run_and_write(compute, print_tables, out, markdown=None):
    """results = compute() (timed), printed, written atomically as JSON to `out`, and with a
    `markdown(results)` writer rendered from that JSON to the .md beside it."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.time()
    results = compute()
    results['seconds'] = time.time() - start
    print_tables(results)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    misc.atomic_write_json(out, results)
    if markdown is not None:
        render.write_markdown(out, markdown)
    print(f'\nWrote {out} ({results["seconds"]:.0f} s)')
