"""Offline image data: procedural shapes, stacked digits, scikit-image's bundled photos, a
user's folder.

Everything here returns numpy arrays, uint8, NHWC, so the same data feeds torch training,
ONNX parity checks and benchmarks alike. Nothing is downloaded: the shapes are drawn from a
seed, the digits and photos ship inside scikit-learn and scikit-image, and a folder is whatever
the user points at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ganforge.errors import DataError
from ganforge.images import IMAGE_SUFFIXES, read_image, to_rgb

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated colours far enough apart that a small classifier tells them apart at 8x8.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
}
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "colorwheel", "camera", "coins", "moon",
                  "brick", "grass", "gravel", "motorcycle_left")
# Photos whose files ship in scikit-image's wheel but have no loader function of their own.
_SKIMAGE_FILES = {"motorcycle_left": "motorcycle_left.png"}
# The split for image-to-image models (denoising, inpainting): whole photos held out, never
# cropped for training. Natural colour scenes on both sides.
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "motorcycle_left", "camera", "coins", "moon", "brick", "grass", "gravel")
HELD_OUT_PHOTOS = ("chelsea", "coffee")
# Natural photos from the other installed packages, for choosing among a run's checkpoints
# (validation): never cropped for training, never part of the held-out test.
VALIDATION_PHOTOS = ("motorcycle_right", "china", "flower", "grace_hopper")
# scikit-learn's 1,797 bundled 8x8 digits, split once, stratified by digit: the stacked-digits
# GAN data and the digit classifier's training come from "train", its accuracy from "test".
DIGITS_TEST_SHARE = 0.2
DIGITS_SPLIT_SEED = 0
STACKED_MODES = 1000          # digit triples (R, G, B)


@dataclass(frozen=True)
class Labelled:
    """Images with the labels they were drawn from (procedural data only)."""

    images: np.ndarray  # (N, H, W, 3) uint8
    shape: np.ndarray   # (N,) int64, index into SHAPES
    colour: np.ndarray  # (N,) int64, index into COLOURS


def shapes(n: int, size: int = 64, seed: int = 0) -> Labelled:
    """Draw `n` images of one coloured shape on a dim gradient background.

    Same (n, size, seed), same bytes. Shape, colour, centre, scale and rotation are drawn per
    image; the background is a soft two-colour gradient so the data is not trivially flat.
    """
    if n < 0:
        raise DataError(f"shapes: n must be >= 0, got {n}")
    if size < 8:
        raise DataError(f"shapes: size must be >= 8, got {size}")
    rng = np.random.default_rng(seed)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    shape_idx = rng.integers(0, len(SHAPES), n)
    colour_idx = rng.integers(0, len(COLOURS), n)
    centre = rng.uniform(0.3, 0.7, (n, 2)) * size
    radius = rng.uniform(0.15, 0.28, n) * size
    angle = rng.uniform(0, 2 * np.pi, n)
    bg_a = rng.uniform(0, 70, (n, 3))
    bg_b = rng.uniform(0, 70, (n, 3))
    bg_dir = rng.uniform(0, 2 * np.pi, n)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        # background: linear gradient along a random direction, (H, W, 3)
        t = (np.cos(bg_dir[i]) * xx + np.sin(bg_dir[i]) * yy) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = bg_a[i] * (1 - t[..., None]) + bg_b[i] * t[..., None]
        # shape coordinates relative to the centre, rotated
        dx, dy = xx - centre[i, 0], yy - centre[i, 1]
        c, s = np.cos(angle[i]), np.sin(angle[i])
        u, v = c * dx + s * dy, -s * dx + c * dy
        r = radius[i]
        kind = SHAPES[shape_idx[i]]
        if kind == "circle":
            inside = u * u + v * v <= r * r
        elif kind == "square":
            inside = (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
        elif kind == "diamond":
            inside = np.abs(u) + np.abs(v) <= r * 1.1
        else:  # triangle: three half-planes of an equilateral triangle
            inside = np.ones_like(u, dtype=bool)
            for k in range(3):
                a = angle[i] * 0 + k * 2 * np.pi / 3
                inside &= (np.cos(a) * u + np.sin(a) * v) <= r * 0.55
        img[inside] = palette[colour_idx[i]]
        images[i] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return Labelled(images=images, shape=shape_idx.astype(np.int64),
                    colour=colour_idx.astype(np.int64))


def digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (8x8, 16 grey levels), one side of the fixed split:
    'train' (1,437 images) or 'test' (360). Returns (N, 8, 8) uint8 in 0..255 and (N,) int64
    labels. The split is stratified by digit and seeded, so it never changes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise DataError(f"digits: split {split!r} is not one of train, test")
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    train, test = train_test_split(np.arange(len(images)), test_size=DIGITS_TEST_SHARE,
                                   stratify=d.target, random_state=DIGITS_SPLIT_SEED)
    idx = np.sort(train if split == "train" else test)
    return images[idx], d.target[idx].astype(np.int64)


@dataclass(frozen=True)
class StackedDigits:
    """Three digits stacked as the R, G and B channels (PacGAN's stacked MNIST, on 8x8 digits)."""

    images: np.ndarray  # (N, S, S, 3) uint8; channel c shows digit labels[:, c]
    labels: np.ndarray  # (N, 3) int64, the digits in R, G, B

    @property
    def modes(self) -> np.ndarray:
        return mode_index(self.labels)


def mode_index(labels: np.ndarray) -> np.ndarray:
    """Digit triples (N, 3) -> mode indices (N,) in 0..999: 100 R + 10 G + B."""
    labels = np.asarray(labels, dtype=np.int64)
    return labels[:, 0] * 100 + labels[:, 1] * 10 + labels[:, 2]


def stacked_digits(n: int, size: int = 16, seed: int = 0, split: str = "train") -> StackedDigits:
    """`n` images of three independent, uniformly drawn digits of `split`, one per channel, each
    8x8 digit enlarged to `size` (a multiple of 8) by pixel replication, so average-pooling a
    channel back to 8x8 gives the digit exactly. Same (n, size, seed, split), same bytes."""
    if n < 0:
        raise DataError(f"stacked_digits: n must be >= 0, got {n}")
    if size < 8 or size % 8:
        raise DataError(f"stacked_digits: size {size} is not allowed; must be a multiple of 8")
    images, labels = digits(split)
    pick = np.random.default_rng(seed).integers(0, len(images), (n, 3))
    # (n, 3, 8, 8) -> (n, 8, 8, 3) -> (n, size, size, 3)
    stacked = images[pick].transpose(0, 2, 3, 1)
    k = size // 8
    stacked = np.repeat(np.repeat(stacked, k, axis=1), k, axis=2)
    return StackedDigits(images=np.ascontiguousarray(stacked), labels=labels[pick])


def mirrorable(data: str) -> bool:
    """Whether a mirrored training image is still an image of `data`: not for digits."""
    return data != "stacked_digits"


def random_crops(photos: list[np.ndarray], n: int, size: int, seed: int,
                 scale: tuple[float, float] = (0.25, 1.0)) -> np.ndarray:
    """`n` random square crops, resized to `size`, from a list of RGB photos."""
    if not photos:
        raise DataError("random_crops: no photos to crop from")
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = square_crop(photos[int(rng.integers(len(photos)))], size, rng, scale)
    return out


def square_crop(photo: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float],
                flip: bool = True) -> np.ndarray:
    """A random square crop with side `scale` x the shorter side (at least `size` where the photo
    allows), resized to `size`, mirrored half the time when `flip`."""
    from PIL import Image

    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(*scale))
    side = max(min(side, h, w), min(size, h, w))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = photo[y0:y0 + side, x0:x0 + side]
    if crop.shape[0] != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def skimage_photos(names: tuple[str, ...] | list[str] = SKIMAGE_PHOTOS) -> list[np.ndarray]:
    """scikit-image's bundled photos as RGB arrays (no download: they ship in the wheel)."""
    from skimage import data as skdata

    photos = []
    for name in names:
        if name not in SKIMAGE_PHOTOS:
            raise DataError(f"unknown scikit-image photo {name!r}; allowed: {', '.join(SKIMAGE_PHOTOS)}")
        if name in _SKIMAGE_FILES:
            from pathlib import Path as _P

            photos.append(read_image(_P(skdata.__file__).parent / _SKIMAGE_FILES[name]))
        else:
            photos.append(to_rgb(getattr(skdata, name)(), f"skimage.data.{name}"))
    return photos


def validation_photos() -> list[np.ndarray]:
    """The VALIDATION_PHOTOS as RGB arrays: scikit-image's `motorcycle_right.png`, scikit-learn's
    `china.jpg` and `flower.jpg`, matplotlib's `grace_hopper.jpg`, all inside the installed wheels."""
    import matplotlib.cbook
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos = [read_image(Path(skdata.__file__).parent / "motorcycle_right.png")]
    sample = load_sample_images()
    photos += [to_rgb(im, f"sklearn {Path(f).name}") for im, f in zip(sample.images, sample.filenames)]
    photos.append(read_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return photos


def folder_photos(folder: str | Path) -> list[np.ndarray]:
    """Every readable image under `folder` (recursively), as RGB arrays."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data: {folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--data: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return [read_image(p) for p in files]


def load_images(data: str, n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """The training images for a `--data` value: 'shapes', 'stacked_digits', 'photos', or a
    folder path."""
    if data == "shapes":
        return shapes(n, size, seed).images
    if data == "stacked_digits":
        return stacked_digits(n, size, seed).images
    if data == "photos":
        return random_crops(skimage_photos(), n, size, seed)
    if Path(data).is_dir():
        return random_crops(folder_photos(data), n, size, seed)
    raise DataError(f"--data: {data!r} is neither 'shapes', 'stacked_digits', 'photos' nor an "
                    "existing folder")
