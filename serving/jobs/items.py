"""One item's work, in its item thread: read and check the image and mask (or find that the
journal's record still holds), and write the inpainted result atomically."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ganforge.errors import DataError
from ganforge.images import read_image
from ganforge.serving.jobs.discovery import MASK_SUFFIX, Item
from ganforge.serving.repository import sha256

if TYPE_CHECKING:
    from ganforge.serving.jobs.runner import JobOptions


@dataclass
class Prepared:
    item: Item
    image: np.ndarray       # (H, W, 3) uint8, the whole input
    mask: np.ndarray        # (H, W) uint8 255 = hole, after dilation
    record: dict            # the journal line without the output's hash


@dataclass(frozen=True)
class Skipped:
    item: Item


@dataclass(frozen=True)
class Failed:
    item: Item
    reason: str


def _settings(opts: JobOptions, tile) -> dict:
    # an any-size model's tile (serving.inpaint.AnySize) is journaled as its text
    return {"model": opts.model, "tile": tile if isinstance(tile, int) else str(tile), "dilate": opts.dilate}


def prepare(item: Item, tile, opts: JobOptions, previous: dict | None):
    """Read and check one item; Skipped when `previous` (its journal line) still holds."""
    from ganforge.masks import dilate, read_mask

    try:
        if item.mask is None:
            raise DataError(f"{item.image}: no mask found (looked for {item.image.stem}{MASK_SUFFIX}.png)")
        image_sha, mask_sha = sha256(item.image), sha256(item.mask)
        record = {"key": item.key, "image": str(item.image), "mask": str(item.mask),
                  "image_sha256": image_sha, "mask_sha256": mask_sha, **_settings(opts, tile)}
        if previous is not None and all(previous.get(k) == record[k] for k in
                                        ("image_sha256", "mask_sha256", "model", "tile", "dilate")):
            if item.output.is_file() and sha256(item.output) == previous.get("output_sha256"):
                return Skipped(item)
        image = read_image(item.image, max_pixels=opts.max_pixels)
        mask = read_mask(item.mask)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{item.mask}: mask size mismatch: mask is {mask.shape[1]}x{mask.shape[0]}, "
                            f"image is {image.shape[1]}x{image.shape[0]}")
        mask = dilate(mask, opts.dilate)
        if not mask.any():
            raise DataError(f"{item.mask}: empty mask: no hole pixel (grey value >= half scale)")
        if mask.all():
            raise DataError(f"{item.mask}: every pixel is a hole; there is nothing to inpaint from")
        return Prepared(item, image, mask, record)
    except DataError as exc:
        return Failed(item, str(exc))
    except OSError as exc:
        return Failed(item, f"{item.image}: cannot read ({exc.strerror or exc})")
    except Exception as exc:  # a decoder's own error (e.g. Pillow's decompression-bomb check)
        return Failed(item, f"{item.image}: cannot be used ({type(exc).__name__}: {exc})")


def write_atomic(path: Path, data: bytes) -> None:
    """`data` under a temporary name in the same folder, flushed, then renamed into place: a
    reader (or a resumed job) never sees a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def finish(p: Prepared, result: np.ndarray) -> dict:
    """Write the inpainted image as PNG; return the journal line."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(result).save(buf, format="PNG")
    data = buf.getvalue()
    write_atomic(p.item.output, data)
    return {**p.record, "output": str(p.item.output),
            "output_sha256": hashlib.sha256(data).hexdigest()}

