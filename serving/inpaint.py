"""Inpainting any image size (numpy + Pillow, no torch).

For each hole region (8-connected components of the mask, found on a coarse grid; regions whose
windows overlap are merged) a square window around it is cropped — at least a tile, and twice
the region's extent so the model sees context on every side — inpainted, and only the hole's
pixels are pasted into the full image. Pixels outside the holes are the input's bytes.

A model that takes T×T tiles (`inpaint_image` with an int tile) gets each window resized down
to the tile and its answer resized back up. A model exported with `--any-size` (`AnySize`: sides
a multiple of its stride) gets each window at the photo's own resolution, padded to the stride;
windows of one padded shape are batched together, because a request's rows share one shape.
Only a window longer than `max_side` is resized, down to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ganforge.errors import DataError, UsageError

GRID = 8  # coarse grid cell for finding hole regions, pixels
# the photo inpainter `ganforge inpaint` and `batch-inpaint` use when none is named: the best photo
# fill measured (docs/inpainting.md)
DEFAULT_MODEL = "fill_thinplate"
MAX_SIDE = 1024            # default cap on an any-size window's longer side, pixels
MAX_SIDE_LIMIT = 4096      # a 4096² window is 64 MiB of image and mask: a quarter of a gRPC message
REQUEST_BYTES = 64 << 20   # image + mask bytes per request: under the client's 256 MiB messages


@dataclass(frozen=True)
class Window:
    y: int
    x: int
    size: int   # square side in the (padded) image


@dataclass(frozen=True)
class AnySize:
    """What a model exported with `--any-size` takes (its config's parameters)."""

    stride: int                 # every side a multiple of this (2**depth for the U-Net)
    min_side: int               # the training tile: the least context a window gets
    max_side: int = MAX_SIDE    # a window with a longer side is resized down to this

    def __str__(self) -> str:   # the batch job's journal records it as its "tile"
        return f"any size (stride {self.stride}, min {self.min_side}, max {self.max_side})"


@dataclass(frozen=True)
class Piece:
    """One window of an any-size plan: the crop of the image, and the shape sent for it."""

    y: int
    x: int
    h: int                      # the crop's rows and columns in the image
    w: int
    scaled: tuple[int, int]     # its size in the request: (h, w) at native size, smaller when resized
    shape: tuple[int, int]      # `scaled` padded up to the stride (and to min_side): what is sent

    @property
    def native(self) -> bool:
        return self.scaled == (self.h, self.w)


def any_size_spec(cfg: dict, model: str, max_side: int = MAX_SIDE,
                  flag: str = "max_side") -> AnySize | None:
    """The AnySize of a served model from its config (Triton's JSON), or None when its `image`
    input has fixed dims. `flag` is how the caller's user types the cap, for the error."""
    image = next((i for i in cfg.get("input", []) if i["name"] == "image"), None)
    if image is None or all(int(d) > 0 for d in image["dims"][:2]):
        return None
    params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
    try:
        stride, min_side = int(params["stride"]), int(params["min_side"])
        if stride < 1 or min_side < stride:
            raise ValueError
    except (KeyError, ValueError):
        raise UsageError(f"model {model!r} takes images of any size but its config lacks the integer "
                         f"parameters 'stride' >= 1 and 'min_side' >= stride (got {params or 'none'}); "
                         f"re-export it with ganforge export --any-size") from None
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) \
            or not min_side <= max_side <= MAX_SIDE_LIMIT:
        raise UsageError(f"{flag}: {max_side!r} is not allowed; must be an integer in [{min_side}, "
                         f"{MAX_SIDE_LIMIT}] ({min_side}: the min_side of model {model!r})")
    return AnySize(stride, min_side, int(max_side))


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


def plan_any_size(mask: np.ndarray, spec: AnySize) -> list[Piece]:
    """The windows of `plan_windows` (at least `spec.min_side`) as crops of the image: clipped
    to it, so a window near a border or in a narrow image is not square; each kept at native
    size unless its longer side passes `spec.max_side`, and padded up to the stride."""
    h, w = mask.shape
    longest = max(spec.max_side // spec.stride * spec.stride, spec.min_side)
    pieces = []
    for win in plan_windows(mask, spec.min_side):
        ch, cw = min(win.size, h - win.y), min(win.size, w - win.x)
        scaled = (ch, cw)
        if max(ch, cw) > longest:
            f = longest / max(ch, cw)
            scaled = (max(1, min(longest, round(ch * f))), max(1, min(longest, round(cw * f))))
        shape = tuple(max(spec.min_side, -(-s // spec.stride) * spec.stride) for s in scaled)
        pieces.append(Piece(win.y, win.x, ch, cw, scaled, shape))
    return pieces


def inpaint_image(image: np.ndarray, mask: np.ndarray, tile: int | AnySize,
                  run: Callable[[np.ndarray, np.ndarray], np.ndarray], max_batch: int) -> np.ndarray:
    """Inpaint (H, W, 3) uint8 `image` where (H, W) `mask` is 255.

    Args:
        image: the photo, (H, W, 3) uint8.
        mask: (H, W) uint8, 255 = hole.
        tile: the model's tile side T, or its AnySize for a model exported with --any-size.
        run: the model: ((B, T, T, 3), (B, T, T, 1)) uint8 -> (B, T, T, 3) uint8 (any-size:
            any (H', W') of the stride in place of (T, T), one shape per call).
        max_batch: the most rows per call.

    Returns:
        A new image; outside the hole it is byte-identical to the input. A mask without a hole
        returns a copy of the image.
    """
    if isinstance(tile, AnySize):
        return _inpaint_any_size(image, mask, tile, run, max_batch)
    check_pair(image, mask)
    h0, w0 = mask.shape
    out = image.copy()
    if not (mask > 0).any():
        return out
    ph, pw = max(tile - h0, 0), max(tile - w0, 0)  # tiny images: pad up to one tile
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge") if (ph or pw) else image
    msk = np.pad(mask, ((0, ph), (0, pw))) if (ph or pw) else mask
    windows = plan_windows(msk, tile)
    # A window may be wider than the image is high (or the reverse): pad so every crop is square.
    side = max(win.size for win in windows)
    eh, ew = max(side - msk.shape[0], 0), max(side - msk.shape[1], 0)
    if eh or ew:
        img = np.pad(img, ((0, eh), (0, ew), (0, 0)), mode="edge")
        msk = np.pad(msk, ((0, eh), (0, ew)))
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


def _inpaint_any_size(image: np.ndarray, mask: np.ndarray, spec: AnySize,
                      run: Callable[[np.ndarray, np.ndarray], np.ndarray], max_batch: int) -> np.ndarray:
    check_pair(image, mask)
    out = image.copy()
    if not (mask > 0).any():
        return out
    pieces = plan_any_size(mask, spec)
    crops = []
    for p in pieces:
        crop = image[p.y:p.y + p.h, p.x:p.x + p.w]
        hole = mask[p.y:p.y + p.h, p.x:p.x + p.w]
        if not p.native:
            crop, hole = _resize_to(crop, p.scaled), _shrink_mask(hole, p.scaled)
        pad = ((0, p.shape[0] - p.scaled[0]), (0, p.shape[1] - p.scaled[1]))
        # edge padding is known context the model sees beyond the border; the mask there is 0
        crops.append((np.pad(crop, (*pad, (0, 0)), mode="edge"), np.pad(hole, pad)[..., None]))
    results: list = [None] * len(pieces)
    for shape in sorted({p.shape for p in pieces}):
        group = [i for i, p in enumerate(pieces) if p.shape == shape]
        n = max(1, min(max_batch, REQUEST_BYTES // (shape[0] * shape[1] * 4)))
        for k in range(0, len(group), n):
            part = group[k:k + n]
            answer = run(np.stack([crops[i][0] for i in part]), np.stack([crops[i][1] for i in part]))
            for i, res in zip(part, answer):
                results[i] = np.asarray(res, np.uint8)
    for p, res in zip(pieces, results):
        full = res[:p.scaled[0], :p.scaled[1]]
        if not p.native:
            full = _resize_to(full, (p.h, p.w))
        region = out[p.y:p.y + p.h, p.x:p.x + p.w]
        hole = mask[p.y:p.y + p.h, p.x:p.x + p.w] > 0
        region[hole] = full[hole]
    return out


def _resize_to(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((shape[1], shape[0]), Image.BICUBIC))


def _shrink_mask(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a mask down so that a pixel is a hole if any pixel under it is: a box filter
    gives every output pixel the mean over its footprint, which is above 0 exactly then."""
    from PIL import Image

    box = Image.fromarray((m > 0).astype(np.float32)).resize((shape[1], shape[0]), Image.BOX)
    return np.where(np.asarray(box) > 0, 255, 0).astype(np.uint8)
