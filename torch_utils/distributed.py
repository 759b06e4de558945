"""Process-group helpers. Works under torchrun (reads RANK / WORLD_SIZE / LOCAL_RANK) and as a
plain single process without any launcher."""

import atexit
import functools
import os

import torch
import torch.distributed as dist

from dnnlib.util import PeerFailure, UserError


def init(device=None):
    """Initialise the default process group when launched by torchrun (NCCL for CUDA, gloo for
    the CPU); a no-op otherwise. Returns the torch.device this process should use (`device`
    checked with `check_device` first)."""
    device = check_device(device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if device.type == 'cuda':
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
        # Leave no live process group behind on any exit, error or not: its communication
        # threads can abort the exiting process ("terminate called without an active exception").
        atexit.register(shutdown)
    return device


def default_device():
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def available_devices():
    """The device strings this machine can run on, for error messages."""
    out = ['cpu']
    if torch.cuda.is_available():
        out += [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        out.append('mps')
    return out


def check_device(text=None, flag='--device'):
    """The torch.device for `text` (None: cuda if available, else cpu), or a UserError in one line
    naming what was given and what is available. A CUDA device without an index is this
    process's LOCAL_RANK under torchrun. Meant to be called at startup, before any model loads."""
    if text is None:
        device = default_device()
    else:
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise UserError(f'{flag}: "{text}" is not a device name; available here: '
                            f'{", ".join(available_devices())}') from None
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    if device.type == 'cpu':
        return device
    usable = {'cuda': lambda i: torch.cuda.is_available() and i < torch.cuda.device_count(),
              'mps': lambda i: (getattr(torch.backends, 'mps', None) is not None
                                and torch.backends.mps.is_available() and (i or 0) == 0)}
    if device.type not in usable or not usable[device.type](device.index):
        given = f'"{text}"' if text is not None else 'the default device'
        if str(device) != text:
            given += f' ({device})'
        raise UserError(f'{flag}: {given} is not available here; available: {", ".join(available_devices())}')
    return device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def collective(fn):
    """A collective operation whose failure means that another process is gone (it exited on an
    error, which it reports itself): this process then stops quietly with PeerFailure instead of
    a traceback of the backend's "Connection closed by peer"."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            if not (is_distributed() and _peer_lost(e)):
                raise                   # a fault of this process: its traceback is wanted
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PeerFailure(f'another process of this run failed ({reason})') from None
    return wrapper


PEER_LOST = ('closed by peer', 'reset by peer', 'broken pipe', 'connection refused', 'timed out')


def _peer_lost(e):
    """Whether a collective failed because a peer process is gone: NCCL says so with its own
    exception type, gloo only in the message."""
    backend_error = getattr(dist, 'DistBackendError', ())
    return isinstance(e, backend_error) or any(text in str(e).lower() for text in PEER_LOST)


@collective
def barrier():
    if is_distributed():
        dist.barrier()


@collective
def all_gather_object(obj):
    """List of `obj` from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(index_rows):
    """`index_rows`: this rank's list of (global_index, tensor). Returns the tensors of all ranks
    stacked in global-index order, so that a reduction over them does not depend on how the rows
    were split over batches and processes."""
    rows = [r for part in all_gather_object([(i, t.cpu()) for i, t in index_rows]) for r in part]
    rows.sort(key=lambda r: r[0])
    return torch.stack([t for _, t in rows])


def sum_over_ranks(value):
    """Sum of a Python number over all processes."""
    return sum(all_gather_object(value))


@collective
def broadcast_object(obj, src=0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _run_on_rank0(fn):
    """fn() on rank 0 (None elsewhere). A UserError there is raised on every rank, so none is
    left waiting (and rank 0 alone prints it)."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result


def rank0_first(fn):
    """fn() on rank 0 first (it may download or unpack), then on the other ranks, which find the
    files in place instead of racing for them. A UserError on rank 0 is raised on every rank; one
    that only a later rank meets is its own to print. Without torchrun it is just fn()."""
    if not is_distributed():
        return fn()
    result = _run_on_rank0(fn)
    if get_rank() == 0:
        return result
    try:
        return fn()
    except UserError as e:
        e.local = True
        raise


def on_rank0(fn):
    """fn() on rank 0 alone, its result broadcast to every rank; a UserError there is raised on
    every rank (rank 0 prints it). For work that must happen once: a check of the output folder
    and its record, a file written for all. Without torchrun it is just fn()."""
    if not is_distributed():
        return fn()
    return broadcast_object(_run_on_rank0(fn))


def resolve_file(url_or_path, flag, cache_dir):
    """Local path of a file or URL, downloaded once into `cache_dir`; errors name `flag`. Not
    collective: under torchrun call it on rank 0 first (`fetch_file`)."""
    import dnnlib
    try:
        return dnnlib.util.resolve_path(url_or_path, cache_dir=cache_dir, progress=get_rank() == 0, flag=flag)
    except UserError as e:
        raise UserError(f'{flag}: {e}') from None


def fetch_file(url_or_path, flag, cache_dir):
    """`resolve_file` on rank 0 first (it downloads), then on the other ranks (they find the file)."""
    return rank0_first(lambda: resolve_file(url_or_path, flag, cache_dir))


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def shutdown():
    if is_distributed():
        dist.destroy_process_group()
