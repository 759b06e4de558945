"""Image sets for the evaluation scripts (fid.py, clip_score.py): a folder tree or a zip of
PNG/JPEG files, read in sorted order, split into batches over torchrun processes.

Two choices keep every result independent of the process count:
- a batch is a fixed block of consecutive images (`split_batches`), whoever computes it;
- `gathered` hands every process the results of all batches in batch order, so sums over them
  are taken in one fixed order (an all-reduce would add per-process partial sums in an order
  that depends on the process count, changing the last bits).
"""

import io
import math
import os
import sys
import zipfile

import numpy as np
import torch
from PIL import Image

from dnnlib.util import UserError
from torch_utils import distributed as dist

IMAGE_EXTS = ('.png', '.jpg', '.jpeg')


class ImageFolder:
    """The image files of a folder (searched recursively) or of a zip file.

    `names` are the images' paths relative to the root with '/' separators, sorted, so a folder
    and a zip of it list the same images in the same order. `files` holds every file name (not
    only images) for looking up side files such as sample.py's <seed>.json.
    """

    def __init__(self, path, flag='--images'):
        self.path = str(path)
        self.flag = flag
        if os.path.isdir(self.path):
            self.kind = 'dir'
            self.files = {os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, '/')
                          for root, _dirs, files in os.walk(self.path) for f in files}
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.kind = 'zip'
            with zipfile.ZipFile(self.path) as z:
                self.files = {n for n in z.namelist() if not n.endswith('/')}
        elif os.path.exists(self.path):
            raise UserError(f'{flag}: "{self.path}" is neither a folder nor a zip file')
        else:
            raise UserError(f'{flag}: "{self.path}" does not exist')
        self.names = sorted(n for n in self.files if n.lower().endswith(IMAGE_EXTS))
        if not self.names:
            raise UserError(f'{flag}: no images ({"/".join(IMAGE_EXTS)}) found in "{self.path}"')
        self._zip = None
        self._zip_pid = None

    def __len__(self):
        return len(self.names)

    def read(self, name):
        """Bytes of the file `name` (relative, '/'-separated)."""
        if self.kind == 'dir':
            with open(os.path.join(self.path, *name.split('/')), 'rb') as f:
                return f.read()
        if self._zip is None or self._zip_pid != os.getpid():   # a zip handle must not cross a fork
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip.read(name)

    def open_image(self, index):
        """PIL image `index`, converted to RGB (grayscale repeated to 3 channels, alpha dropped)."""
        img = Image.open(io.BytesIO(self.read(self.names[index])))
        img.load()
        return img if img.mode == 'RGB' else img.convert('RGB')

    def image_size(self, index):
        """(width, height) of image `index`; UserError for an unreadable file."""
        try:
            with Image.open(io.BytesIO(self.read(self.names[index]))) as img:
                return img.size
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f'{self.flag}: cannot read image "{self.names[index]}" ({e})') from None

    def __getstate__(self):     # for DataLoader workers: reopen the zip in the worker
        return dict(self.__dict__, _zip=None, _zip_pid=None)


def select(num_images, num=None, seed=0, flag='--num'):
    """Indices of the images to use: all of them, or with `num` a random subset of `num` images
    chosen by `seed` and kept in sorted order. The subset is the one NVlabs' EDM picks for the
    same count and seed (numpy RandomState shuffle of arange, first `num`, sorted)."""
    idx = np.arange(num_images, dtype=np.int64)
    if num is None or num == num_images:
        return idx.tolist()
    if num > num_images:
        raise UserError(f'{flag}: asked for {num} images but found only {num_images}')
    np.random.RandomState(seed % (1 << 31)).shuffle(idx)
    return np.sort(idx[:num]).tolist()


def split_batches(indices, batch):
    """Consecutive blocks of at most `batch` indices; the same blocks for any process count."""
    return [indices[i:i + batch] for i in range(0, len(indices), batch)]


class ImageDataset(torch.utils.data.Dataset):
    """Item k: (image, error text). The image is uint8 [3, H, W] (or `transform(PIL image)`).
    A broken image or one whose size differs from `size` gives an error text instead of an
    exception, so the caller can stop every process with the same one-line message (an exception
    in a DataLoader worker comes back wrapped in a multi-line report)."""

    def __init__(self, folder, size=None, reference=None, transform=None):
        self.folder = folder
        self.size = size            # (width, height) every image must have, or None
        self.reference = reference  # the image `size` was taken from, named in the error
        self.transform = transform

    def __len__(self):
        return len(self.folder)

    def _placeholder(self):
        if self.transform is not None:
            return None
        w, h = self.size if self.size is not None else (1, 1)
        return torch.zeros([3, h, w], dtype=torch.uint8)

    def __getitem__(self, index):
        name = self.folder.names[index]
        try:
            img = self.folder.open_image(index)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            return self._placeholder(), f'{self.folder.flag}: cannot read image "{name}" ({e})'
        if self.size is not None and img.size != tuple(self.size):
            first = self.reference or self.folder.names[0]
            return self._placeholder(), (
                f'{self.folder.flag}: images differ in size: "{name}" is {img.size[0]}x{img.size[1]}, '
                f'"{first}" is {self.size[0]}x{self.size[1]}; all images must have one size')
        if self.transform is not None:
            return self.transform(img), ''
        return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()), ''


def _collate(items):
    errors = [e for _, e in items if e]
    if errors:
        return None, errors[0]
    return torch.stack([x for x, _ in items]), ''


def gathered(dataset, batches, fn, workers=0, desc=None):
    """Run `fn(images, batch_indices)` on this process's share of `batches` (batch r, r + world,
    ... on rank r) and yield, on every process, `(batch_indices, result)` for all batches in
    batch order. `fn` must return something picklable (CPU tensors). An unreadable image raises
    the same UserError on every process."""
    from tqdm import tqdm

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batches[rank::world]
    loader = None
    if mine:
        # More workers than cores only slows decoding down (and makes torch print a warning).
        workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=workers,
                                                  collate_fn=_collate))
    steps = math.ceil(len(batches) / world)
    # The bar goes to stdout as sample.py's does: stderr stays free for the one-line error.
    with tqdm(total=steps, desc=desc, unit='batch', disable=(rank != 0), file=sys.stdout) as bar:
        for step in range(steps):
            part = None
            if step < len(mine):
                images, error = next(loader)
                part = (None, error)
                if not error:
                    try:
                        part = (fn(images, mine[step]), '')
                    except UserError as e:      # e.g. a detector of the wrong shape: stop every rank
                        part = (None, str(e))
            parts = dist.all_gather_object(part)
            for p in parts:
                if p is not None and p[1]:
                    raise UserError(p[1])
            for r, p in enumerate(parts):       # rank order at one step is batch order
                if p is not None:
                    yield batches[step * world + r], p[0]
            bar.update(1)
