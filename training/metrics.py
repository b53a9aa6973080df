"""Sample quality: a Fréchet distance in the feature space of a small shapes classifier.

FID needs Inception weights, which cannot be downloaded here. ganforge instead trains, offline
and from a seed, a small CNN that tells the procedural shapes' shape (4 classes) and colour (6
classes) apart, and measures the Fréchet distance between Gaussians fitted to its 128-d
penultimate features of real and generated images:

    FD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

The classifier is trained once per (settings) and cached as a small file; the same seed gives
the same weights. See docs/metrics.md for its accuracy on held-out shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganforge.training import datasets
from ganforge.training.loop import to_tensor


@dataclass(frozen=True)
class ClassifierSettings:
    n_train: int = 6000       # procedural shapes drawn for training
    n_test: int = 2000        # held-out shapes (another seed) for the accuracy figures
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 1234          # seeds the data (train: seed, test: seed + 1) and the init
    size: int = 64            # side the shapes are drawn at; inputs are pooled to 32x32


class ShapesClassifier(nn.Module):
    """image (B, 3, H, W) in [-1, 1], any H = W >= 32 -> features (B, 128), shape and colour
    logits. Inputs are average-pooled to 32x32 first, so 64 and 128 px images share it."""

    FEATURES = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 16, self.FEATURES), nn.ReLU())    # (B, 128)
        self.shape_head = nn.Linear(self.FEATURES, len(datasets.SHAPES))
        self.colour_head = nn.Linear(self.FEATURES, len(datasets.COLOURS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = F.adaptive_avg_pool2d(x, 32)                                # (B, 3, 32, 32)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.shape_head(f), self.colour_head(f)


def _accuracy(model: ShapesClassifier, data: datasets.Labelled) -> dict:
    model.eval()
    with torch.no_grad():
        preds = [model(to_tensor(data.images[i:i + 256])) for i in range(0, len(data.images), 256)]
    shape = torch.cat([p[1] for p in preds]).argmax(1).numpy()
    colour = torch.cat([p[2] for p in preds]).argmax(1).numpy()
    return {"shape": float((shape == data.shape).mean()),
            "colour": float((colour == data.colour).mean()),
            "both": float(((shape == data.shape) & (colour == data.colour)).mean())}


def train_classifier(s: ClassifierSettings = ClassifierSettings()) -> tuple[ShapesClassifier, dict]:
    """Train the classifier from the seed; return it (eval mode) and its held-out accuracy."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    train = datasets.shapes(s.n_train, s.size, seed=s.seed)
    test = datasets.shapes(s.n_test, s.size, seed=s.seed + 1)
    model = ShapesClassifier()
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


def load_classifier(cache_dir: str | Path | None = None,
                    s: ClassifierSettings = ClassifierSettings()) -> tuple[ShapesClassifier, dict]:
    """The cached classifier for these settings, trained (about a minute on 2 cores) and
    written to the cache on first use. Returns the model and its held-out accuracy."""
    key = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"shapes_classifier-{key}.pt"
    model = ShapesClassifier()
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["state"])
        return model.eval(), payload["accuracy"]
    model, acc = train_classifier(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save({"state": model.state_dict(), "accuracy": acc, "settings": asdict(s)}, tmp)
    tmp.replace(path)
    return model, acc


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
