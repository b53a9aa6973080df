"""Tiling for fixed-size image models (numpy only): any image size through a model that takes
T×T tiles.

Tiles overlap by `overlap` pixels and are blended with weights that are zero within `margin`
pixels of a tile's inner edges and ramp up to one after, so each output pixel comes only from
tiles in which it lies at least `margin` pixels from an inner edge. With `margin` at least the
model's receptive-field radius, tiled output equals a whole-image run up to rounding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ganforge.errors import UsageError


def positions(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, size) with at least `overlap` pixels shared."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, start_edge: bool, end_edge: bool, margin: int, ramp: int) -> np.ndarray:
    """1-D weights: zero within `margin` of an inner edge, rising to one over `ramp` pixels."""
    w = np.ones(length, np.float64)
    d = np.arange(length, dtype=np.float64)
    up = np.clip((d - margin + 1) / ramp, 0, 1)
    if not start_edge:
        w = np.minimum(w, up)
    if not end_edge:
        w = np.minimum(w, up[::-1])
    return w


def run_tiled(image: np.ndarray, tile: int, run: Callable[[np.ndarray], np.ndarray],
              max_batch: int, overlap: int = 32, margin: int = 10) -> np.ndarray:
    """Apply `run` ((B, T, T, 3) uint8 -> same) over an (H, W, 3) uint8 image of any size.

    Images smaller than a tile are reflect-padded up to it; the padding is cropped away.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UsageError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if not 0 <= 2 * margin < overlap < tile:
        raise UsageError(f"tiling: need 0 <= 2*margin < overlap < tile, got margin {margin}, "
                         f"overlap {overlap}, tile {tile}")
    h0, w0 = image.shape[:2]
    ph, pw = max(tile - h0, 0), max(tile - w0, 0)
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect") if (ph or pw) else image
    h, w = img.shape[:2]
    ys, xs = positions(h, tile, overlap), positions(w, tile, overlap)
    coords = [(y, x) for y in ys for x in xs]
    ramp = overlap // 2 - margin
    acc = np.zeros((h, w, 3), np.float64)
    wsum = np.zeros((h, w, 1), np.float64)
    for i in range(0, len(coords), max_batch):
        chunk = coords[i:i + max_batch]
        batch = np.stack([img[y:y + tile, x:x + tile] for y, x in chunk])
        out = run(batch)
        for (y, x), o in zip(chunk, out):
            wy = _ramp(tile, y == 0, y + tile >= h, margin, ramp)
            wx = _ramp(tile, x == 0, x + tile >= w, margin, ramp)
            wt = (wy[:, None] * wx[None, :])[..., None]
            acc[y:y + tile, x:x + tile] += o.astype(np.float64) * wt
            wsum[y:y + tile, x:x + tile] += wt
    out = np.clip(np.round(acc / np.maximum(wsum, 1e-12)), 0, 255).astype(np.uint8)
    return out[:h0, :w0]
