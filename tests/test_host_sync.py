"""The solver loop never makes the host wait for the device (issue 16, goal 4).

A denoiser call that copies a Python number to the GPU, or reads a value back, waits for every
kernel queued before it: the GPU then idles while Python launches the next network call. The
checks run every solver, and every network family's denoiser, on the `meta` device (shapes only,
nothing computed) and record each call that would move data between host and device."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import schedules
import solvers
from models import adm, cm, edm, edm_networks, sd, unet
from models.clip_text import CLIPTextConfig, CLIPTextModel
from models.discrete import scaled_linear_alphas_cumprod

META = torch.device('meta')
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}


def _target_device(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
    return None


class HostTransfers(TorchFunctionMode):
    """Records the calls that read a device tensor on the host, or copy host data to a device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', str(func))
        if func in READS and args[0].device.type != 'cpu':
            self.calls.append(f'{name} of a {args[0].device.type} tensor')
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get('device') is not None:
            device, data = torch.device(kwargs['device']), args[0] if args else kwargs.get('data')
            if device.type != 'cpu' and not (isinstance(data, torch.Tensor) and data.device == device):
                self.calls.append(f'{name}(host data, device={device.type})')
        elif func in (torch.Tensor.to, torch.Tensor.copy_):
            source, target = args[0].device, _target_device(args[1:], kwargs)
            if target is not None and target != source and 'cpu' in (source.type, target.type):
                self.calls.append(f'{name} from {source.type} to {target.type}')
        return func(*args, **kwargs)


def tiny_families():
    """EDM (both preconditionings), ADM with classifier guidance, the consistency model and Stable
    Diffusion with classifier-free guidance (LDM's path less the text), bound as sample.py binds
    them, on `meta`."""
    torch.manual_seed(0)
    tiny = dict(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16, num_blocks=1,
                attn_resolutions=[4], dropout=0.0)
    adm_unet = unet.UNetModel(image_size=8, model_channels=32, out_channels=6, num_res_blocks=1,
                              attention_resolutions=(2,), channel_mult=(1, 1), num_classes=10, num_head_channels=32,
                              use_scale_shift_norm=True, resblock_updown=True)
    classifier = unet.EncoderUNetModel(image_size=8, model_channels=32, out_channels=10, num_res_blocks=1,
                                       attention_resolutions=(2,), channel_mult=(1, 1), num_head_channels=32,
                                       use_scale_shift_norm=True, resblock_updown=True, pool='attention')
    cm_unet = unet.UNetModel(image_size=8, model_channels=32, out_channels=3, num_res_blocks=1,
                             attention_resolutions=(2,), channel_mult=(1, 1), num_head_channels=32)
    sd_unet = unet.UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                             attention_resolutions=(1,), channel_mult=(1,), num_heads=2, use_spatial_transformer=True,
                             context_dim=16)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2))
    alphas_cumprod = scaled_linear_alphas_cumprod(0.00085, 0.012)
    stable_diffusion = sd.StableDiffusion(sd_unet, torch.nn.Identity(), text, alphas_cumprod, 4, 8, 0.18215,
                                          guidance_rate=7.5, prompt='', device=META)
    text_condition = dict(condition=torch.empty(2, 77, 16, device=META),
                          unconditional_condition=torch.empty(2, 77, 16, device=META))
    labels = torch.zeros(2, 10, device=META)
    families = {
        'edm': (edm.EDMModel(edm_networks.EDMPrecond(label_dim=0, **tiny), device=META), {}),
        'edm-vp': (edm.EDMModel(edm_networks.VPPrecond(label_dim=0, **tiny), device=META), {}),
        'adm-guided': (adm.ADMModel(adm_unet, classifier, guidance_rate=1.0, device=META),
                       dict(class_labels=labels)),
        'cm': (cm.CMEDMModel(cm_unet, device=META), {}),
        'sd-cfg': (stable_diffusion, text_condition),
    }
    return {name: (model, model.bind(**cond)) for name, (model, cond) in families.items()}


FAMILIES = tiny_families()


def scaled_denoiser(x, sigma):
    """A denoiser that does its work on x's device and moves nothing."""
    return x / (1 + float(sigma) ** 2)


@pytest.mark.parametrize('solver', sorted(solvers.SOLVERS))
def test_solvers_move_nothing_between_host_and_device(solver):
    t_steps = schedules.get_schedule(6, 0.002, 80)
    x = torch.empty(2, 3, 8, 8, device=META)
    with HostTransfers() as seen:
        for options in (dict(), dict(afs=True, denoise_to_zero=True)):
            out = solvers.SOLVERS[solver](scaled_denoiser, x * float(t_steps[0]), t_steps, **options)
            assert out.device == META and out.shape == x.shape
    assert not seen.calls, f'{solver}: {sorted(set(seen.calls))}'


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_denoisers_move_nothing_between_host_and_device(family):
    """Each family's denoiser, as the solvers call it (a Python number for sigma)."""
    model, denoise = FAMILIES[family]
    x = torch.empty(2, 3, 8, 8, device=META)
    with HostTransfers() as seen, torch.no_grad():
        x = torch.empty(2, *model.shape, device=META)
        for sigma in (model.sigma_max, 1.0, model.sigma_min):
            out = denoise(x, sigma)
            assert out.device == META and out.shape == x.shape
    assert not seen.calls, f'{family}: {sorted(set(seen.calls))}'


def test_the_detector_sees_each_kind_of_transfer():
    x = torch.empty(3, device=META)
    with HostTransfers() as seen:
        torch.as_tensor(1.5, device=x.device)
        torch.tensor([1.0]).to(x.device)
        torch.full([3], 1.5, device=x.device)           # a fill on the device: no transfer
        x.to(torch.float64)                              # same device: no transfer
        with pytest.raises(RuntimeError):
            float(x.sum())
    assert seen.calls == ['as_tensor(host data, device=meta)', 'to from cpu to meta', '__float__ of a meta tensor']
