"""lsun_bedroom: the consistency-models repository's EDM-trained 256x256 LSUN bedroom network
(edm_bedroom256_ema.pt), a guided-diffusion-style UNet (flash attention layout, 2-d attention
convs, no scale-shift norm) under EDM's preconditioning with sigma_data = 0.5:

    D(x; sigma) = c_skip x + c_out F(c_in x, 250 ln(sigma + 1e-44))
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2)

The file stores float16 weights; they are upcast to float32 on loading, and the torso runs in
float16 again only with use_fp16 on CUDA. Like the GITS code (and unlike the ADM wrapper), the
denoised output is not clamped: it is the plain EDM denoiser.
"""

import math

import torch

from .adm import class_index, fetch, load_unet
from .base import resolve_fp16
from .base import Model

MODEL_URL = 'https://openaipublic.blob.core.windows.net/consistency/edm_bedroom256_ema.pt'


class CMEDMModel(Model):
    sigma_min = 0.002
    sigma_max = 80.0
    sigma_data = 0.5
    supports_fp16 = True

    def __init__(self, net, device='cpu'):
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.img_channels = net.in_channels
        self.img_resolution = net.image_size
        self.label_dim = net.num_classes or 0

    def scalings(self, sigma):
        sd2, s2 = self.sigma_data ** 2, sigma ** 2
        return sd2 / (s2 + sd2), sigma * self.sigma_data / math.sqrt(s2 + sd2), 1 / math.sqrt(s2 + sd2)

    def denoise(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        sigma = float(sigma)
        c_skip, c_out, c_in = self.scalings(sigma)
        t = torch.full([x.shape[0]], 250 * math.log(sigma + 1e-44), dtype=torch.float32, device=x.device)
        out = self.net(c_in * x, t, y=class_index(class_labels, self.label_dim))
        return c_skip * x + c_out * out.to(x.dtype)


def load_lsun_bedroom(model_path=None, device='cpu', use_fp16=None, network_kwargs=None, **kw):
    """`network_kwargs` (library use) override the constructor arguments inferred from the file."""
    from . import reject_options
    reject_options('lsun_bedroom', kw)
    fp16 = resolve_fp16(use_fp16, device)
    path = fetch(model_path or MODEL_URL, 'lsun_bedroom', flag='--model_path' if model_path else None)
    net = load_unet(path, attention_type='flash', network_kwargs=network_kwargs)
    if fp16:
        net.convert_to_fp16()
    model = CMEDMModel(net, device=device)
    model.use_fp16, model.checkpoint_files = fp16, (path,)
    return model
