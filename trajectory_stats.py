"""Per-seed measurements of trajectories over many seeds, streamed batch by batch and gathered in
seed order under torchrun, and their per-noise-level summaries.

Only per-seed scalars are kept (an array [Q, N] per seed: Q quantities at N points of the
trajectory), never the trajectories themselves, so 50k seeds cost 50k * Q * N numbers. Each seed's
row depends on its seed alone (per-seed noise from torch_utils.seeds, batch-invariant models), the
rows are gathered and put in seed order before any reduction, and the summaries are reductions of
that one array: the result is the same for any batch size and process count.
"""

import numpy as np
import torch

import run_schedule
from torch_utils import distributed as dist
from torch_utils.seeds import seed_batch, split_batches

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def measure_seeds(model, seeds, batch, device, measure, evals_per_seed, desc='Trajectories'):
    """`measure(denoise, noise) -> [B, ...]` on this process's share of the seed batches (EDM's
    split, as sample.py samples them), every process's rows gathered: the array [len(seeds), ...]
    in the order of `seeds`, on every process (float64, CPU). A progress bar counts this process's
    denoiser evaluations (`evals_per_seed` each)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = split_batches(seeds, batch, world)
    starts = np.cumsum([0] + [len(b) for b in batches]).tolist()     # the position of each batch in `seeds`
    mine = [(starts[k], b) for k, b in enumerate(batches) if k % world == rank and b]
    rows = []
    with run_schedule.progress(sum(len(b) for _, b in mine) * evals_per_seed, desc) as bar:
        for start, part in mine:
            noise, denoise = seed_batch(model, part, device)
            values = measure(run_schedule.counting(denoise, bar), noise).to('cpu', torch.float64)
            rows.extend((start + i, v) for i, v in enumerate(values))
    return dist.gather_in_order(rows)


def summarize(values):
    """Per point summaries over seeds of `values` [S, N]: mean, standard deviation and QUANTILES,
    as lists for the JSON. A point where some seed has no value (NaN) has none (null)."""
    v = np.asarray(values, dtype=np.float64)
    out = dict(mean=v.mean(0), std=v.std(0))
    out.update({f'q{round(q * 100):02d}': np.quantile(v, q, axis=0) for q in QUANTILES})
    return {k: [None if np.isnan(a) else float(a) for a in arr] for k, arr in out.items()}
