"""Inpainting masks as numpy arrays (no torch): (H, W) uint8, 255 = hole, 0 = known.

Generators are seeded (same seed, same mask): a centre square, random rectangular blocks, and
random free-form strokes (thick polylines, as in Yu et al. 2019's free-form masks).
"""

from __future__ import annotations

import numpy as np

from ganforge.errors import DataError

HOLE = 255
KNOWN = 0
MASK_VALUES = (KNOWN, HOLE)  # the only values a served inpainter's mask input may hold


def centre(h: int, w: int, area: float = 0.25) -> np.ndarray:
    """A centred square-ish hole covering `area` of the image."""
    m = np.zeros((h, w), np.uint8)
    mh, mw = int(round(h * np.sqrt(area))), int(round(w * np.sqrt(area)))
    y, x = (h - mh) // 2, (w - mw) // 2
    m[y:y + mh, x:x + mw] = HOLE
    return m


def blocks(h: int, w: int, seed: int, n: tuple[int, int] = (1, 4),
           size: tuple[float, float] = (0.1, 0.35)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(n[0], n[1] + 1))):
        bh, bw = int(h * rng.uniform(*size)), int(w * rng.uniform(*size))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        m[y:y + bh, x:x + bw] = HOLE
    return m


def regions(h: int, w: int, seed: int, target: tuple[float, float] = (0.2, 0.3),
            size: tuple[float, float] = (0.15, 0.45)) -> np.ndarray:
    """Random rectangles (sides `size` of the image's) added until the hole covers a share of
    the image within `target`; the last one is shrunk when it would overshoot."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    goal = rng.uniform(*target)
    for _ in range(64):
        bh, bw = max(int(h * rng.uniform(*size)), 1), max(int(w * rng.uniform(*size)), 1)
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        trial = m.copy()
        trial[y:y + bh, x:x + bw] = HOLE
        while (trial > 0).mean() > target[1] and min(bh, bw) > 1:
            bh, bw = bh - 1, bw - 1
            trial = m.copy()
            trial[y:y + bh, x:x + bw] = HOLE
        m = trial
        if (m > 0).mean() >= goal:
            break
    return m


def strokes(h: int, w: int, seed: int, n: tuple[int, int] = (2, 5), width: tuple[float, float] = (0.04, 0.1),
            target: tuple[float, float] = (0.15, 0.3)) -> np.ndarray:
    """Random thick polylines until the hole covers a share of the image within `target`."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    goal = rng.uniform(*target)
    for _ in range(64):
        for _ in range(int(rng.integers(n[0], n[1] + 1))):
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h)))]
            for _ in range(int(rng.integers(2, 6))):
                a, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.35) * max(h, w)
                x, y = pts[-1]
                pts.append((float(np.clip(x + r * np.cos(a), 0, w - 1)), float(np.clip(y + r * np.sin(a), 0, h - 1))))
            lw = max(int(rng.uniform(*width) * max(h, w)), 1)
            draw.line(pts, fill=HOLE, width=lw, joint="curve")
        if (np.asarray(img) > 0).mean() >= goal:
            break
    return np.asarray(img, dtype=np.uint8).copy()


def make(kind: str, h: int, w: int, seed: int = 0) -> np.ndarray:
    if kind == "centre":
        return centre(h, w)
    if kind == "blocks":
        return blocks(h, w, seed)
    if kind == "strokes":
        return strokes(h, w, seed)
    raise DataError(f"mask kind: {kind!r} is not allowed; choose centre, blocks or strokes")


def mixed(h: int, w: int, seed: int) -> np.ndarray:
    """The training mixture: centre squares, blocks and strokes in equal shares."""
    kind = ("centre", "blocks", "strokes")[seed % 3]
    return make(kind, h, w, seed)


def to_binary(mask: np.ndarray, source: str = "mask") -> np.ndarray:
    """Any mask image (grey, RGB, RGBA, 16-bit; any values) to (H, W) uint8 {0, 255}: a pixel is
    a hole where its grey value is at least half of full scale."""
    m = np.asarray(mask)
    if m.ndim == 3:
        if m.shape[2] == 4:   # RGBA: a transparent pixel is not a hole
            m = np.where(m[..., 3:4] > 0, m[..., :3], 0)
        m = m[..., :3].max(axis=2) if m.shape[2] >= 3 else m[..., 0]
    if m.ndim != 2:
        raise DataError(f"{source}: expected a 2-D mask image, got shape {list(m.shape)}")
    full = 65535 if m.dtype == np.uint16 else (1 if m.dtype == bool or (m.dtype.kind == "f" and m.max(initial=0) <= 1) else 255)
    return np.where(m.astype(np.float64) >= full / 2, HOLE, 0).astype(np.uint8)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the hole by `pixels` (square structuring element)."""
    if pixels <= 0:
        return mask
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(2 * pixels + 1)))


def read_mask(path, flag: str | None = None) -> np.ndarray:
    """A mask file as (H, W) uint8, 255 = hole, by `to_binary`'s rule (a grey value of at least
    half of full scale; a transparent pixel is not a hole). Errors name `flag` when given."""
    from PIL import Image, UnidentifiedImageError

    where = f"{flag}: {path}" if flag else str(path)
    try:
        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "L")
            return to_binary(np.asarray(im), str(path))
    except FileNotFoundError:
        raise DataError(f"{where}: no such mask file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: not a readable mask ({exc})") from None
