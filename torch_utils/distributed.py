"""Process-group helpers. Works under torchrun (reads RANK / WORLD_SIZE / LOCAL_RANK) and as a
plain single process without any launcher."""

import os

import torch
import torch.distributed as dist

from dnnlib.util import UserError


def init(device=None):
    """Initialise the default process group when launched by torchrun (NCCL for CUDA, gloo for
    the CPU); a no-op otherwise. Returns the torch.device this process should use."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if device.type == 'cuda':
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
    return device


def default_device():
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum `tensor` over all processes and return the result (a new tensor on tensor's device).
    gloo reduces on the CPU; NCCL needs the tensor on the current CUDA device."""
    if not is_distributed():
        return tensor.clone()
    backend = dist.get_backend()
    work = tensor.detach().clone()
    if backend == 'nccl':
        work = work.cuda()
    else:
        work = work.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


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


def broadcast_object(obj, src=0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0_first(fn):
    """fn() on rank 0 first (it may download or unpack), then on the other ranks, which find the
    files in place instead of racing for them. A UserError on rank 0 is raised on every rank, so
    none is left waiting. Without torchrun it is just fn()."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result if get_rank() == 0 else fn()


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
