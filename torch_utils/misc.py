"""Small helpers: seed lists, per-seed random draws, the per-seed error, atomic file writes, file
fingerprints."""

import hashlib
import json
import os
import re
import tempfile

import torch


def parse_int_list(text):
    """Parse '0-63,100,200-299' into a list of ints (ranges inclusive). Raises ValueError."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    out = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if m is None:
            raise ValueError(f'"{part}" is not a non-negative integer or a range a-b')
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f'range "{part}" is empty (end before start)')
        out.extend(range(lo, hi + 1))
    if not out:
        raise ValueError('empty list')
    return out


def seed_generator(seed):
    """The CPU generator that everything drawn for one seed comes from. Drawing per seed on the
    CPU makes a seed's noise and label independent of batch size, process count and device."""
    return torch.Generator(device='cpu').manual_seed(int(seed))


def per_seed_rmse(x, ref):
    """RMSE of each sample against its reference [B] (float64, CPU). The project's one error
    measure: benchmarks and the search report its mean over seeds."""
    diff = (x.to(torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1)
    return diff.square().mean(-1).sqrt().cpu()


def default_file_mode():
    """Permissions a plain open() would give a new file (mkstemp's are owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path, data):
    """Write `data` to `path` through a temporary file in the same folder and a rename, so that
    readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + '\n').encode())


def file_fingerprint(path, whole=False, chunk=1 << 20):
    """Identity of a file's content: its size and a SHA-256, of the whole file (`whole`, for small
    files) or of its first and last MiB (for multi-GB checkpoints). Unlike a path or a modification
    time it survives copies and fresh downloads of the same file; the head/tail hash costs two small
    reads, and checkpoints that differ in their weights differ there: a torch.save zip ends with its
    central directory, which holds every entry's CRC-32; a pickle or safetensors file ends with
    weight data."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        if whole:
            for block in iter(lambda: f.read(chunk), b''):
                digest.update(block)
            return dict(size=size, sha256=digest.hexdigest())
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            digest.update(f.read(chunk))
    return dict(size=size, sha256_head_tail=digest.hexdigest())
