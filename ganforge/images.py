"""Image files, grids and masks as small numpy functions (no torch), shared by every stage."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ganforge.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def to_rgb(array: np.ndarray, source: str) -> np.ndarray:
    """Any 2-D / 3-D image array (grey, grey+alpha, RGB, RGBA; uint8, uint16, bool, float) to
    uint8 RGB (H, W, 3)."""
    a = np.asarray(array)
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        scale = 255.0 if a.size and float(a.max()) <= 1.0 else 1.0
        a = np.clip(a.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] in (2, 4):  # grey+alpha, RGBA: drop alpha
        a = a[..., :-1]
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DataError(f"{source}: cannot read as an RGB image, array shape {a.shape}")
    return np.ascontiguousarray(a)


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3).

    Greyscale, RGBA, palette and 16-bit images are converted. Raises DataError naming the file
    when it is not a readable image or has more than `max_pixels` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(f"{path}: {im.width}x{im.height} is larger than the limit of "
                                f"{max_pixels} pixels")
            if im.mode.startswith("I;16") or im.mode == "I":
                return to_rgb(np.asarray(im).astype(np.uint16), str(path))
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1", "L", "F"):
                im = im.convert("RGB")
            return to_rgb(np.asarray(im), str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write uint8 (H, W, 3|1) or (H, W) to `path` atomically: a temporary name, then rename,
    so a reader never sees a partial file under the final name."""
    from PIL import Image

    path = Path(path)
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    try:
        Image.fromarray(a).save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows*H', cols*W', C) picture."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    return out


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """Write a grid of uint8 NHWC images as one PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, grid(images, nrow))
