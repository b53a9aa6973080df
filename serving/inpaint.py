"""Inpainting any image size with a model that takes T×T tiles (numpy + Pillow, no torch).

For each hole region (8-connected components of the mask, found on a coarse grid; regions whose
windows overlap are merged) a square window around it is cropped — at least a tile, and twice
the region's extent so the model sees context on every side — resized down to the tile when
larger, inpainted, resized back, and only the hole's pixels are pasted into the full image.
Pixels outside the holes are the input's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ganforge.errors import DataError

GRID = 8  # coarse grid cell for finding hole regions, pixels


@dataclass(frozen=True)
class Window:
    y: int
    x: int
    size: int   # square side in the (padded) image


def check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"image: expected uint8 (H, W, 3), got {image.dtype} {list(image.shape)}")
    if mask.shape != image.shape[:2]:
        raise DataError(f"mask: size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                        f"{image.shape[1]}x{image.shape[0]}")


def hole_regions(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (y0, x0, y1, x1) of the hole's connected regions (on a GRID-pixel grid)."""
    h, w = mask.shape
    gh, gw = -(-h // GRID), -(-w // GRID)
    padded = np.zeros((gh * GRID, gw * GRID), bool)
    padded[:h, :w] = mask > 0
    cells = padded.reshape(gh, GRID, gw, GRID).any(axis=(1, 3))
    label = np.zeros(cells.shape, np.int32)
    boxes = []
    for sy, sx in zip(*np.nonzero(cells)):
        if label[sy, sx]:
            continue
        n = len(boxes) + 1
        label[sy, sx] = n
        stack, y0, x0, y1, x1 = [(sy, sx)], sy, sx, sy, sx
        while stack:
            cy, cx = stack.pop()
            y0, x0, y1, x1 = min(y0, cy), min(x0, cx), max(y1, cy), max(x1, cx)
            for ny in (cy - 1, cy, cy + 1):
                for nx in (cx - 1, cx, cx + 1):
                    if 0 <= ny < gh and 0 <= nx < gw and cells[ny, nx] and not label[ny, nx]:
                        label[ny, nx] = n
                        stack.append((ny, nx))
        boxes.append((y0 * GRID, x0 * GRID, min((y1 + 1) * GRID, h), min((x1 + 1) * GRID, w)))
    return boxes


def plan_windows(mask: np.ndarray, tile: int, context: float = 2.0) -> list[Window]:
    """Square windows covering every hole region with context around it, merged when they overlap."""
    h, w = mask.shape
    boxes = hole_regions(mask)
    merged = True
    while merged:  # merge boxes whose windows would overlap: one window sees both holes
        merged = False
        wins = [_window(b, h, w, tile, context) for b in boxes]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = wins[i], wins[j]
                if a.y < b.y + b.size and b.y < a.y + a.size and a.x < b.x + b.size and b.x < a.x + a.size:
                    bi, bj = boxes[i], boxes[j]
                    boxes[i] = (min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return [_window(b, h, w, tile, context) for b in boxes]


def _window(box, h, w, tile, context) -> Window:
    y0, x0, y1, x1 = box
    side = max(tile, int(np.ceil(max(y1 - y0, x1 - x0) * context)))
    side = min(side, max(h, w))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    y = int(np.clip(cy - side // 2, 0, max(h - side, 0)))
    x = int(np.clip(cx - side // 2, 0, max(w - side, 0)))
    return Window(y, x, side)


def _resize(a: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    if a.shape[0] == size and a.shape[1] == size:
        return a
    im = Image.fromarray(a)
    return np.asarray(im.resize((size, size), Image.NEAREST if nearest else Image.BICUBIC))


def inpaint_image(image: np.ndarray, mask: np.ndarray, tile: int,
                  run: Callable[[np.ndarray, np.ndarray], np.ndarray], max_batch: int) -> np.ndarray:
    """Inpaint (H, W, 3) uint8 `image` where (H, W) `mask` is 255 with a tile model `run`
    ((B, T, T, 3), (B, T, T, 1) -> (B, T, T, 3)). Returns a new image; outside the hole it is
    byte-identical to the input. A mask without a hole returns a copy of the image."""
    check_pair(image, mask)
    h0, w0 = mask.shape
    out = image.copy()
    if not (mask > 0).any():
        return out
    ph, pw = max(tile - h0, 0), max(tile - w0, 0)  # tiny images: pad up to one tile
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge") if (ph or pw) else image
    msk = np.pad(mask, ((0, ph), (0, pw))) if (ph or pw) else mask
    windows = plan_windows(msk, tile)
    tiles, tmasks = [], []
    for win in windows:
        crop = img[win.y:win.y + win.size, win.x:win.x + win.size]
        cm = msk[win.y:win.y + win.size, win.x:win.x + win.size]
        tiles.append(_resize(crop, tile))
        # downsizing must not shrink the hole: a tile pixel is a hole if any pixel under it is
        small = cm if win.size == tile else _resize(_max_pool_to(cm, tile), tile, nearest=True)
        tmasks.append(small[..., None])
    results = []
    for i in range(0, len(tiles), max_batch):
        results.extend(run(np.stack(tiles[i:i + max_batch]), np.stack(tmasks[i:i + max_batch])))
    for win, res in zip(windows, results):
        full = _resize(np.asarray(res, np.uint8), win.size)
        y1, x1 = min(win.y + win.size, h0), min(win.x + win.size, w0)
        region = out[win.y:y1, win.x:x1]
        hole = mask[win.y:y1, win.x:x1] > 0
        region[hole] = full[:y1 - win.y, :x1 - win.x][hole]
    return out


def _max_pool_to(m: np.ndarray, size: int) -> np.ndarray:
    """Max-pool a square mask to about `size` so small holes survive the resize."""
    k = max(m.shape[0] // size, 1)
    if k == 1:
        return m
    n = (m.shape[0] // k) * k
    return m[:n, :n].reshape(n // k, k, n // k, k).max(axis=(1, 3))
