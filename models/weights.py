"""Reading plain weight files (name -> tensor), shared by the checkpoint loaders.

Two container formats carry the same flat state dicts:
- `.safetensors` (a JSON header and raw tensor bytes; the SD v1.5 release's
  `v1-5-pruned-emaonly.safetensors`, diffusers folders, most community checkpoints): read with the
  `safetensors` library, which never unpickles anything. A file with that extension always takes
  this path, so a damaged one fails here instead of falling through to a pickle reader.
- everything else (`.pt`, `.bin`, `.ckpt` without Lightning extras): `torch.load(weights_only=True)`.
"""

import torch

from dnnlib.util import UserError

SAFETENSORS_SUFFIX = '.safetensors'


def is_safetensors(path):
    return str(path).lower().endswith(SAFETENSORS_SUFFIX)


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_safetensors(path, flag='--model_path'):
    """All tensors of a .safetensors file on the CPU. A truncated or corrupted file (its header
    does not describe the bytes that follow) is one line of UserError naming `flag`."""
    import safetensors
    import safetensors.torch
    try:
        sd = safetensors.torch.load_file(str(path), device='cpu')
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f'{flag}: cannot read "{path}" as a .safetensors file ({_first_line(e)}); it is truncated '
                        'or corrupted: if it was downloaded, delete it to fetch it again') from None
    if not sd:
        raise UserError(f'{flag}: "{path}" holds no tensors')
    return sd


def read_state_dict(path, flag='--model_path'):
    """A plain weight file as a dict name -> tensor: .safetensors through the safetensors library,
    anything else through torch.load(weights_only=True)."""
    if is_safetensors(path):
        return read_safetensors(path, flag)
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:        # zip/pickle errors of truncated or foreign files, unsafe pickles
        raise UserError(f'{flag}: cannot read "{path}" as a PyTorch weight file ({_first_line(e)}); '
                        'if it was downloaded, delete it to fetch it again') from None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f'{flag}: "{path}" is not a plain state dict (name -> tensor)')
    return sd
