"""Training data as the engine reads it: map-style Datasets indexed by (index, epoch), a sampler
that gives each rank its slice of every global batch, and the DataLoader around them.

Folders are streamed: a `FolderImages` holds the list of file paths, nothing else; images are
decoded in DataLoader worker processes (`--workers`) one batch at a time, so memory does not
grow with the folder. A folder is read recursively (png, jpg, jpeg, webp, bmp, gif, tif), or
`--data` names a text file (one path per line) or a `.jsonl` file (`{"path": ...}` per line).
A file that cannot be decoded is replaced in its batch by the next readable file, and named
with its error in the run's summary (`bad_files.json`): one bad file never stops a run.

The bundled sets (procedural shapes, stacked digits, scikit-image's photos) are small and made
in memory (`ArrayImages`, `PhotoCrops`), behind the same interface.

Every random choice of an item (crop, flip) comes from a generator seeded by (seed, epoch,
index): the same item gets the same augmentation in any worker, on any rank, after a resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ganforge.errors import DataError, UsageError
from ganforge.images import read_image
from ganforge.training.datasets import square_crop

STREAM_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


HELD_OUT_EPOCH = 2**31 - 1     # the doctor's held-out batch: an epoch training never reaches


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([stream, seed, epoch, index])


def list_files(source: str | Path) -> list[str]:
    """The image files of a `--data` source: a folder (recursive), a text file of paths, or a
    .jsonl file of {"path": ...}; relative paths in a list are taken from the list's folder."""
    p = Path(source)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in STREAM_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"--data: no images ({', '.join(STREAM_SUFFIXES)}) under {p}")
        return files
    if p.is_file() and p.suffix.lower() in (".txt", ".jsonl", ".lst"):
        files = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if p.suffix.lower() == ".jsonl":
                try:
                    line = json.loads(line)["path"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"--data: {p} line {n} is not a JSON object with a \"path\"") from None
            f = Path(line)
            files.append(str(f if f.is_absolute() else p.parent / f))
        if not files:
            raise DataError(f"--data: {p} lists no files")
        return files
    raise DataError(f"--data: {str(source)!r} is neither a bundled set, a folder of images, nor a "
                    f".txt / .jsonl list of image paths")


def is_streamed(data: str) -> bool:
    p = Path(data)
    return p.is_dir() or (p.is_file() and p.suffix.lower() in (".txt", ".jsonl", ".lst"))


class SquareCrop:
    """The transform of a streamed image: `square_crop` with a size and scale (picklable, for
    worker processes started by spawn)."""

    def __init__(self, size: int, scale: tuple[float, float], flip: bool = True):
        self.size, self.scale, self.flip = size, scale, flip

    def __call__(self, photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return square_crop(photo, self.size, rng, self.scale, self.flip)


class FolderImages(Dataset):
    """Image files streamed from disk; `transform(photo, rng)` -> uint8 array per item."""

    def __init__(self, source: str | Path, transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                 seed: int = 0):
        self.files = list_files(source)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> tuple[np.ndarray, list[tuple[str, str]]]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        bad = []
        for k in range(min(len(self.files), 64)):   # the next readable file stands in for a bad one
            i = (index + k) % len(self.files)
            try:
                photo = read_image(self.files[i])
            except Exception as exc:   # any decoding failure: PIL, truncated files, permissions
                bad.append((self.files[i], str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__))
                continue
            return self.transform(photo, item_rng(self.seed, epoch, index)), bad
        raise DataError(f"--data: 64 files in a row from {self.files[index]} could not be read; "
                        f"first error: {bad[0][1]}")


class ArrayImages(Dataset):
    """An in-memory uint8 NHWC set (the bundled sets), mirrored half the time when `flip`."""

    def __init__(self, images: np.ndarray, seed: int = 0, flip: bool = False):
        self.images, self.seed, self.flip = images, seed, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        img = self.images[index]
        if self.flip and item_rng(self.seed, epoch, index).random() < 0.5:
            img = img[:, ::-1]
        return np.ascontiguousarray(img), []


class PhotoCrops(Dataset):
    """`n` square crops of in-memory photos: crop i is fixed for the run (seeded by its index),
    a pool drawn once, as the image models have always trained on the bundled photos."""

    def __init__(self, photos: list[np.ndarray], n: int, size: int, seed: int, scale: tuple[float, float]):
        if not photos:
            raise DataError("--data: no photos to crop from")
        self.photos, self.n, self.size, self.seed, self.scale = photos, n, size, seed, scale

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index = key[0] if isinstance(key, tuple) else key
        rng = item_rng(self.seed, 0, index, stream=1)
        photo = self.photos[int(rng.integers(len(self.photos)))]
        return square_crop(photo, self.size, rng, self.scale), []


class ShardedSampler(Sampler):
    """(index, epoch) pairs for one rank: the epoch's permutation (seed + epoch) cut into global
    batches, each cut into contiguous per-rank slices; starts `start` global batches into the
    epoch (a resumed run). The last partial global batch is dropped."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int, start: int = 0):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.local = global_batch // world
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return max(0, self.n // self.global_batch - self.start) * self.local

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        lo = self.rank * self.local
        for b in range(self.start, self.n // self.global_batch):
            chunk = perm[b * self.global_batch:(b + 1) * self.global_batch]
            for i in chunk[lo:lo + self.local]:
                yield (i, self.epoch)


def collate(items: list[tuple[np.ndarray, list]]) -> tuple[torch.Tensor, list]:
    arrays = np.stack([a for a, _ in items])
    bad = [b for _, bs in items for b in bs]
    return torch.from_numpy(arrays), bad


def loader(dataset: Dataset, local_batch: int, global_batch: int, rank: int, world: int, seed: int,
           epoch: int, start: int, workers: int, pin: bool = False) -> DataLoader:
    sampler = ShardedSampler(len(dataset), global_batch, rank, world, seed, epoch, start)
    return DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin, drop_last=True,
                      prefetch_factor=4 if workers else None,
                      persistent_workers=False)


# ---------------------------------------------------------------------------------------------
# The data sets of the image models, by `--data` value

def gan_images(data: str, n: int, size: int, seed: int) -> Dataset:
    """A GAN's training images at `size`: a bundled set ('shapes', 'stacked_digits', 'photos',
    `n` images made in memory) or a streamed folder / list (each file once per epoch, a random
    square crop of 1/4 to all of its shorter side, mirrored half the time)."""
    from ganforge.training import datasets

    if data in ("shapes", "stacked_digits", "photos"):
        return ArrayImages(datasets.load_images(data, n, size, seed), seed, flip=datasets.mirrorable(data))
    if is_streamed(data):
        return FolderImages(data, SquareCrop(size, (0.25, 1.0)), seed)
    raise UsageError(f"--data: {data!r} is neither 'shapes', 'stacked_digits', 'photos', a folder of "
                     f"images nor a .txt / .jsonl list of image paths")


def held_out(dataset: Dataset, n: int, seed: int) -> np.ndarray:
    """`n` items of a data set, fixed by `seed` (the doctor's held-out batch for streamed data)."""
    idx = np.random.default_rng(seed).choice(len(dataset), size=min(n, len(dataset)), replace=False)
    return np.stack([dataset[(int(i), HELD_OUT_EPOCH)][0] for i in idx])
