"""Per-seed inputs and their split over batches and processes.

Everything drawn for one seed (its noise, then its class label) comes from a CPU generator seeded
by the seed alone, so an image depends on its seed only: not on the batch size, the number of
processes, the device or an interruption. sample.py, the GITS warm-up, trajectory.py and the
benchmarks all draw through here.
"""

import math

import numpy as np
import torch

from torch_utils import misc


def draw_seed_inputs(seeds, shape, label_dim):
    """Per-seed noise [B, *shape] (float64) and class indices [B] (None for unconditional
    models), each row from the seed's own generator: noise first, then the label, as EDM's
    generate.py does."""
    noise, labels = [], []
    for s in seeds:
        g = misc.seed_generator(s)
        noise.append(torch.randn(list(shape), generator=g, dtype=torch.float64))
        if label_dim:
            labels.append(torch.randint(label_dim, [1], generator=g))
    return torch.stack(noise), (torch.cat(labels) if label_dim else None)


def split_batches(seeds, batch, world_size):
    """EDM's split: batches of at most `batch` seeds in total over all ranks, a multiple of
    world_size of them; rank r takes batches r, r + world, ..."""
    num_batches = max(1, math.ceil(len(seeds) / batch)) * world_size
    return [b.tolist() for b in np.array_split(np.array(seeds, dtype=np.int64), num_batches)]


def seed_batch(model, seeds, device, class_idx=None, warmup=False, inputs=None):
    """Noise (float32 on `device`) and the model's denoiser bound to the seeds' conditioning.
    `class_idx` fixes the class of a class-conditional model. Warm-up seeds (GITS) are never
    sampled: a model whose conditioning is tied to the sampled seeds (SD's prompt file: prompt i
    for seed i) draws it another way for them (`warmup_conditioning`). `inputs`: the seeds'
    `draw_seed_inputs`, if already drawn (see `drawn_ahead`)."""
    noise, labels = inputs if inputs is not None else draw_seed_inputs(seeds, model.shape, model.label_dim)
    if labels is not None and class_idx is not None:
        labels[:] = class_idx
    conditioning = getattr(model, 'warmup_conditioning', model.conditioning) if warmup else model.conditioning
    denoise = model.bind(**conditioning(seeds, labels))
    return noise.to(device=device, dtype=torch.float32), denoise


def drawn_ahead(batches, shape, label_dim, executor):
    """(seeds, `draw_seed_inputs`) for each batch (a non-empty list of seeds), the next batch's
    drawn on `executor` while the caller works on the current one: on a GPU the host would
    otherwise draw them (for 256 images of 3x256x256, 50 M normals) while the device waits. The
    inputs of a seed stay its own."""
    pending = executor.submit(draw_seed_inputs, batches[0], shape, label_dim) if batches else None
    for k, seeds in enumerate(batches):
        inputs = pending.result()
        if k + 1 < len(batches):
            pending = executor.submit(draw_seed_inputs, batches[k + 1], shape, label_dim)
        yield seeds, inputs
