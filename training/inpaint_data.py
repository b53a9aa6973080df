"""The inpainter's training data: crops with a hole for a residual model; for a blend, crop-mask
pairs whose candidate fills are computed once (`pair_fills`), drawn by index, mirrored and
turned, optionally balanced by which fill wins each pair.

Every item is a function of (index, epoch) and the seed, so a run on several ranks, with worker
processes or after a resume draws what one process does. Apart from inpainting.py so that the
Task reads as the training step, and these pools as the data it steps over.
"""

from __future__ import annotations

import numpy as np
import torch

from ganforge import masks as maskgen
from ganforge.progress import Progress
from ganforge.training import data as tdata
from ganforge.training.inpaint_nets import ContextEncoder
from ganforge.training.gan_task import to_tensor


def pair_fills(G: ContextEncoder, crops: np.ndarray, masks: np.ndarray, progress: bool,
               chunk: int = 64, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The blend's candidate fills for every crop-mask pair, (N, 3, 3, T, T) in `dtype` (float16
    for the training pool, which is large), and their band errors (N, 3) (None without
    `blend_validate`), on F's device."""
    dev = next(G.parameters()).device
    out, errs = [], []
    bar = Progress(len(crops), "classical fills", unit="crop", enabled=progress)
    with torch.no_grad():
        for i in range(0, len(crops), chunk):
            x = to_tensor(crops[i:i + chunk]).to(dev)
            m = torch.from_numpy(masks[i:i + chunk]).float().div(255)[:, None].to(dev)
            out.append(G.fills(x * (1 - m), m).to(dtype))
            e = G.band_errors(x * (1 - m), m)
            if e is not None:
                errs.append(e)
            bar.update(len(x))
    bar.close()
    return torch.cat(out), (torch.cat(errs) if errs else None)


MASK_SEEDS = 1024   # a residual model's training masks: maskgen.mixed of one of these seeds


class HoledCrops(tdata.Dataset):
    """Training crops with a hole: (T, T, 4) uint8, the crop and its mask (255 = hole) as a fourth
    channel. The mask is one of MASK_SEEDS training masks (centre, blocks, strokes), drawn per
    item and epoch by `item_rng`: the same on any rank, in any worker, after a resume."""

    def __init__(self, crops: tdata.Dataset, tile: int, seed: int):
        self.crops, self.tile, self.seed = crops, tile, seed

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key
        crop, bad = self.crops[key]
        s = int(tdata.item_rng(self.seed, epoch, index, stream=2).integers(MASK_SEEDS))
        return np.concatenate([crop, maskgen.mixed(self.tile, self.tile, s)[..., None]], axis=-1), bad


class PairDraw(tdata.Dataset):
    """The blend's training pairs, drawn by index: (3,) int64, the pair, a mirror flag and the
    quarter turns it is seen under. With `p`, item (index, epoch) draws its pair with those
    probabilities (`balanced_draw`); without, item i is pair i."""

    def __init__(self, n: int, seed: int, p: np.ndarray | None = None):
        self.n, self.seed, self.p = n, seed, p

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key
        rng = tdata.item_rng(self.seed, epoch, index, stream=3)
        pair = index if self.p is None else int(rng.choice(self.n, p=self.p))
        return np.array([pair, rng.random() < 0.5, rng.integers(4)], np.int64), []


def orient(t: torch.Tensor, flip: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """(B, ..., T, T) square tiles, each mirrored where `flip` (B,), then turned `turns` (B,)
    quarter turns."""
    shape = (-1,) + (1,) * (t.dim() - 1)
    t = torch.where(flip.bool().view(shape), t.flip(-1), t)
    out = t
    for k in (1, 2, 3):
        out = torch.where((turns == k).view(shape), t.rot90(k, (-2, -1)), out)
    return out


def crop_pool(crops: tdata.Dataset, n: int) -> tuple[np.ndarray, list]:
    """`n` crops of a data set, fixed for the run (a folder's files taken in turn, a fresh crop
    of each on every pass), and the files that could not be read."""
    items = [crops[(i % len(crops), i // len(crops))] for i in range(n)]
    return np.stack([a for a, _ in items]), [b for _, bs in items for b in bs]


def fill_winners(crops: np.ndarray, masks: np.ndarray, fills: torch.Tensor) -> np.ndarray:
    """For each crop-mask pair, the index of the candidate fill with the lowest hole MSE."""
    won = []
    for i in range(0, len(crops), 256):
        x = to_tensor(crops[i:i + 256]).to(fills.device)
        m = torch.from_numpy(masks[i:i + 256]).to(fills.device).float().div(255)[:, None, None]  # (B, 1, 1, T, T)
        won.append((((fills[i:i + 256].float() - x[:, None]) ** 2) * m).sum((2, 3, 4)).argmin(1).cpu())
    return torch.cat(won).numpy()


def balanced_draw(winners: np.ndarray, k: int) -> np.ndarray:
    """Sampling probabilities over the pairs under which each of the `k` fills that wins any
    pair wins an equal share: a pair's probability is 1 / (how many pairs its fill wins)."""
    count = np.bincount(winners, minlength=k)
    p = 1.0 / count[winners]
    return p / p.sum()
