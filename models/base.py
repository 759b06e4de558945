"""The interface every model family implements: a denoiser D(x; sigma) in EDM's parametrisation.

Solvers and the GITS search only ever see `denoise(x, sigma)`; a model wrapper binds its
conditioning (class labels, prompts, guidance) into that callable with `bind`.
"""

import functools

import torch

from dnnlib.util import UserError


class Model:
    sigma_min = 0.002
    sigma_max = 80.0
    img_channels = 3
    img_resolution = 32
    label_dim = 0                 # >0: class-conditional; class_labels are one-hot [B, label_dim]
    supports_fp16 = False
    use_fp16 = False              # whether the network runs in half precision (it changes the images)
    checkpoint_files = ()         # local files the weights were read from (a run's record fingerprints them)
    latent_space = False          # True: the ODE runs on autoencoder latents, whose values are not data in [-1, 1]

    @property
    def shape(self):
        """Shape of one sample in the space the ODE is solved in (latent space for LDM/SD)."""
        return (self.img_channels, self.img_resolution, self.img_resolution)

    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        raise NotImplementedError

    def decode(self, x):
        """Map samples of the ODE's space to images in [-1, 1]. Identity in pixel space."""
        return x

    def conditioning(self, seeds, labels=None):
        """Keyword arguments of `denoise` for a batch of seeds. `labels` are the per-seed class
        indices drawn by the caller (int64 [B]) for class-conditional models."""
        if self.label_dim:
            if labels is None:
                raise ValueError('class-conditional model needs labels')
            onehot = torch.nn.functional.one_hot(labels.long().cpu(), self.label_dim)
            return dict(class_labels=onehot.to(dtype=torch.float32, device=self.device))
        return {}

    def image_info(self, seed):
        """Per-image facts worth recording next to the image (e.g. the prompt), or None."""
        return None

    def bind(self, **cond):
        """`denoise(x, sigma)` with the conditioning fixed."""
        return functools.partial(self.denoise, **cond)

    device = torch.device('cpu')


def resolve_fp16(use_fp16, device, default=True):
    """The --use_fp16 rule shared by every network family. None: half precision on CUDA when the
    family's default says so (EDM passes the pickle's own training setting). True elsewhere is an
    error, not a silent fallback: the networks only run float16 on CUDA, so the flag would
    otherwise be ignored without notice."""
    device = torch.device(device)
    if use_fp16 is None:
        return device.type == 'cuda' and bool(default)
    if use_fp16 and device.type != 'cuda':
        raise UserError(f'--use_fp16: half precision needs a CUDA device (this run uses "{device}"); '
                        'drop the flag or pass --use_fp16=False')
    return bool(use_fp16)
