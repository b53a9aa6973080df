"""Sample quality and mode coverage, each measured with a small classifier trained offline.

FID needs Inception weights, which cannot be downloaded here. ganforge instead trains, offline
and from a seed, a small CNN that tells the procedural shapes' shape (4 classes) and colour (6
classes) apart, and measures the Fréchet distance between Gaussians fitted to its 128-d
penultimate features of real and generated images:

    FD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

Mode counting on stacked digits (PacGAN's stacked MNIST, Lin et al. 2018, on scikit-learn's 8x8
digits): a small digit CNN, trained on the "train" side of `datasets.digits` and scored on its
held-out "test" side, reads each channel of a generated image; the digit triple is its mode
(1,000 in all). Over N samples, with q the share of samples per mode:

    modes = #{m : q_m > 0}        KL(q || uniform) = sum_m q_m log(1000 q_m)   (nats)

Each classifier is trained once per (settings) and cached as a small file; the same seed gives
the same weights on a given machine, whatever the caller's thread count: training runs on one
thread (`_one_thread`), since the float sums of a multi-threaded step differ with the thread count
and, for the 16 px classifier, so did the verdicts of `ganforge bench doctor` (docs/metrics.md).
See docs/metrics.md and docs/doctor.md for their held-out accuracy.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganforge.training import datasets
from ganforge.training.gan_task import to_tensor


@dataclass(frozen=True)
class ClassifierSettings:
    n_train: int = 6000       # procedural shapes drawn for training
    n_test: int = 2000        # held-out shapes (another seed) for the accuracy figures
    epochs: int = 12          # 4 left the shape head near chance (docs/metrics.md)
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 1234          # seeds the data (train: seed, test: seed + 1) and the init
    size: int = 64            # side the shapes are drawn at; inputs are pooled to 32x32


def settings_for(side: int) -> ClassifierSettings:
    """The settings of the classifier whose domain holds `side` px images: the 64 px one serves
    every side >= 32 (all are pooled to 32x32); a smaller side gets a classifier of its own,
    trained on shapes drawn at that side, since the 64 px one rates upsampled 16 px images
    out of its domain (docs/metrics.md)."""
    if side < 4:
        raise ValueError(f"side {side} is not allowed; must be >= 4")
    return ClassifierSettings() if side >= 32 else ClassifierSettings(size=side)


class ShapesClassifier(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> features (B, 128), shape and colour logits. Inputs are
    resized to 32x32 first (average-pooled down, repeated up). Its domain: images of the side
    it was trained at, `size`; one trained at >= 32 px takes any side >= 32."""

    FEATURES = 128

    def __init__(self, size: int = ClassifierSettings.size):
        super().__init__()
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 16, self.FEATURES), nn.ReLU())    # (B, 128)
        self.shape_head = nn.Linear(self.FEATURES, len(datasets.SHAPES))
        self.colour_head = nn.Linear(self.FEATURES, len(datasets.COLOURS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        if not (side == self.size or min(side, self.size) >= 32):
            allowed = f"{self.size}" if self.size < 32 else ">= 32"
            raise ValueError(f"image side {side} is outside the domain of the shapes classifier trained "
                             f"at {self.size} px (allowed: {allowed}); load `settings_for({side})`")
        if side != 32:
            x = F.adaptive_avg_pool2d(x, 32)                                # (B, 3, 32, 32)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.shape_head(f), self.colour_head(f)


def _outline(shape: np.ndarray) -> np.ndarray:
    """Shape labels with "diamond" counted as "square": under the shapes' random rotation a
    diamond is a square 9 % smaller, so only the size tells them apart, and no classifier can
    name them much better than by a coin toss. The outlines that differ are three."""
    return np.where(shape == datasets.SHAPES.index("diamond"), datasets.SHAPES.index("square"), shape)


def _accuracy(model: ShapesClassifier, data: datasets.Labelled) -> dict:
    """Held-out accuracy of the heads: "shape" (4 classes), "outline" (square and diamond as
    one, see `_outline`), "colour" and "both" (shape and colour right)."""
    model.eval()
    with torch.no_grad():
        preds = [model(to_tensor(data.images[i:i + 256])) for i in range(0, len(data.images), 256)]
    shape = torch.cat([p[1] for p in preds]).argmax(1).numpy()
    colour = torch.cat([p[2] for p in preds]).argmax(1).numpy()
    return {"shape": float((shape == data.shape).mean()),
            "outline": float((_outline(shape) == _outline(data.shape)).mean()),
            "colour": float((colour == data.colour).mean()),
            "both": float(((shape == data.shape) & (colour == data.colour)).mean())}


def train_classifier(s: ClassifierSettings = ClassifierSettings()) -> tuple[ShapesClassifier, dict]:
    """Train the classifier from the seed; return it (eval mode) and its held-out accuracy."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    train = datasets.shapes(s.n_train, s.size, seed=s.seed)
    test = datasets.shapes(s.n_test, s.size, seed=s.seed + 1)
    model = ShapesClassifier(s.size)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    x_all = to_tensor(train.images)
    y_shape, y_colour = torch.from_numpy(train.shape), torch.from_numpy(train.colour)
    for _ in range(s.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(s.n_train))
        for i in range(0, s.n_train, s.batch_size):
            idx = order[i:i + s.batch_size]
            _, ls, lc = model(x_all[idx])
            loss = F.cross_entropy(ls, y_shape[idx]) + F.cross_entropy(lc, y_colour[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), _accuracy(model, test)


def default_cache_dir() -> Path:
    return Path(os.environ.get("GANFORGE_CACHE", Path.home() / ".cache" / "ganforge"))


@contextmanager
def _one_thread():
    """Torch on one intra-op thread for the block, the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cached(name: str, settings, train, model: nn.Module,
            cache_dir: str | Path | None) -> tuple[nn.Module, dict]:
    """`model` with the weights cached for (name, settings), trained by `train(settings)` and
    written to the cache when the file is missing (on one thread: the same weights whatever the
    caller's thread count). Returns the model (eval mode) and accuracy."""
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"{name}-{key}.pt"
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["state"])
        return model.eval(), payload["accuracy"]
    with _one_thread():
        model, acc = train(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save({"state": model.state_dict(), "accuracy": acc, "settings": asdict(settings)}, tmp)
    tmp.replace(path)
    return model, acc


def load_classifier(cache_dir: str | Path | None = None,
                    s: ClassifierSettings = ClassifierSettings()) -> tuple[ShapesClassifier, dict]:
    """The cached classifier for these settings (`settings_for(side)` for images of that side),
    trained (about a minute on 2 cores) and written to the cache on first use. Returns the model
    and its held-out accuracy."""
    return _cached("shapes_classifier", s, train_classifier, ShapesClassifier(s.size), cache_dir)


@torch.no_grad()
def features(model: ShapesClassifier, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 NHWC array or float NCHW tensor in [-1, 1] -> (N, 128) float64 features."""
    x = to_tensor(images) if isinstance(images, np.ndarray) else images
    return torch.cat([model.features(x[i:i + 256]) for i in range(0, len(x), 256)]).double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets (rows are samples)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------
# Mode counting on stacked digits

@dataclass(frozen=True)
class DigitClassifierSettings:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    shift: int = 1            # random translation of each batch by up to this many pixels
    seed: int = 1234          # seeds the init and the batch order


class DigitClassifier(nn.Module):
    """digit (B, 1, H, W) in [-1, 1], H = W a multiple of 8 -> logits (B, 10). Inputs larger
    than 8x8 are average-pooled to 8x8 first (undoing the data's pixel replication)."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),                      # (B, 32, 8, 8)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),               # (B, 128)
            nn.Linear(128, 10))                                             # (B, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 8:
            x = F.adaptive_avg_pool2d(x, 8)                                 # (B, 1, 8, 8)
        return self.main(x)


def _digit_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 8, 8) -> float (N, 1, 8, 8) in [-1, 1]."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]


@torch.no_grad()
def predict_digits(model: DigitClassifier, x: torch.Tensor) -> np.ndarray:
    """float (N, 1, H, W) in [-1, 1] -> (N,) int64 digits."""
    model.eval()
    return torch.cat([model(x[i:i + 4096]).argmax(1) for i in range(0, len(x), 4096)]).numpy()


def train_digit_classifier(s: DigitClassifierSettings = DigitClassifierSettings()
                           ) -> tuple[DigitClassifier, dict]:
    """Train on the digits' "train" side from the seed (a few seconds on one core); return the
    model (eval mode) and its accuracy on the held-out "test" side."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    train_x, train_y = datasets.digits("train")
    test_x, test_y = datasets.digits("test")
    x_all, y_all = _digit_tensor(train_x), torch.from_numpy(train_y)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    k = s.shift
    for _ in range(s.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x_all)))
        for i in range(0, len(x_all), s.batch_size):
            idx = order[i:i + s.batch_size]
            x = F.pad(x_all[idx], (k, k, k, k), value=-1.0)                 # (B, 1, 8+2k, 8+2k)
            dy, dx = rng.integers(0, 2 * k + 1, 2)
            x = x[:, :, dy:dy + 8, dx:dx + 8]                               # (B, 1, 8, 8)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    pred = predict_digits(model, _digit_tensor(test_x))
    return model.eval(), {"digit": float((pred == test_y).mean()), "n_test": int(len(test_y)),
                          "n_train": int(len(train_y))}


def load_digit_classifier(cache_dir: str | Path | None = None,
                          s: DigitClassifierSettings = DigitClassifierSettings()
                          ) -> tuple[DigitClassifier, dict]:
    """The cached digit classifier for these settings, trained and written to the cache on
    first use. Returns the model and its held-out accuracy ({"digit", "n_test", "n_train"})."""
    return _cached("digit_classifier", s, train_digit_classifier, DigitClassifier(), cache_dir)


def classify_stacked(model: DigitClassifier, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Stacked-digit images, uint8 NHWC or float NCHW in [-1, 1] -> (N, 3) digits, one per
    channel (R, G, B)."""
    x = to_tensor(images) if isinstance(images, np.ndarray) else images
    n, c, h, w = x.shape
    assert c == 3, "stacked digits have 3 channels"
    # (N, 3, H, W) -> (3N, 1, H, W): every channel classified on its own
    return predict_digits(model, x.reshape(n * c, 1, h, w)).reshape(n, c)


def mode_coverage(modes: np.ndarray, n_modes: int = datasets.STACKED_MODES) -> dict:
    """Mode indices of N samples -> {"modes": modes hit at least once, "kl": KL(q || uniform)
    in nats}, q the samples' distribution over the `n_modes` modes. Uniform q gives KL 0, a
    single mode log(n_modes)."""
    counts = np.bincount(np.asarray(modes, dtype=np.int64), minlength=n_modes)
    if len(counts) != n_modes or counts.sum() == 0:
        raise ValueError(f"mode indices must lie in 0..{n_modes - 1} and be at least one")
    q = counts[counts > 0] / counts.sum()
    return {"modes": int((counts > 0).sum()), "kl": float(np.sum(q * np.log(q * n_modes)))}


@torch.no_grad()
def stacked_mode_coverage(G: nn.Module, model: DigitClassifier, n: int, seed: int,
                          batch: int = 1000) -> dict:
    """Draw `n` samples from G (its current mode; eval for a trained G) with latents from
    `seed`, classify every channel and count modes. Returns mode_coverage's figures and the
    mode of every sample ("sample_modes", (n,) int16)."""
    z_dim = G.cfg.z_dim
    rng = np.random.default_rng(seed)
    modes = []
    for i in range(0, n, batch):
        z = torch.from_numpy(rng.standard_normal((min(batch, n - i), z_dim)).astype(np.float32))
        modes.append(datasets.mode_index(classify_stacked(model, G(z))))
    modes = np.concatenate(modes)
    return {**mode_coverage(modes), "sample_modes": modes.astype(np.int16)}
