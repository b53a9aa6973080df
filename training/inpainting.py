"""The context encoder for inpainting (Pathak et al., 2016), as in the course:

    L_rec = ‖M ⊙ (x − F((1−M) ⊙ x))‖²          (masked L2: the hole only)
    L_adv = max_D E[log D(x) + log(1 − D(F((1−M) ⊙ x)))]
    L     = λ_rec L_rec + λ_adv L_adv,  λ_rec = 0.999, λ_adv = 0.001

F, the generator, is fed the masked image (and the mask), not noise. Here F is a convolutional
encoder-decoder with dilated convolutions at the bottleneck (a receptive field wider than the
holes, as in Iizuka et al. 2017), so it runs on any tile size; D is a DCGAN-style discriminator
on the completed image. The training doctor (training/monitor.py) watches the adversarial part:
s_G / s_D on a fixed held-out batch (held-out photos, fixed masks; its "latents" are the masked
inputs), diagnoses in metrics.jsonl, scores.png and doctor.md in the run directory.

Training runs on the engine (engine.py): `ganforge train inpainter`, its options the fields of
`InpaintTrainConfig` and `ContextEncoderConfig`, presets in presets/inpainter/. Crops and hole
masks come per item from the data set (a blend's pairs, with their precomputed fills, by index),
so a run on several ranks trains as one process does.

The classical fills are in classical_fills.py, the networks and their config in inpaint_nets.py,
the training pairs and pools in inpaint_data.py; this module holds the training config, the
validation and the Task.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ganforge import masks as maskgen
from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.training import datasets
from ganforge.training.autoencoders import REC_REDUCTIONS, completed, image_crops, masked_mse, paint_update, psnr
from ganforge.training.distributed import rank_local
from ganforge.training.engine import Engine, atomic_save
from ganforge.training.inpaint_data import (HoledCrops, PairDraw, balanced_draw, crop_pool, fill_winners, orient,
                                            pair_fills)
from ganforge.training.inpaint_nets import ContextEncoder, ContextEncoderConfig, Critic, check_network
from ganforge.training.gan_task import GANDoctor, GANOptions, to_tensor, to_uint8
from ganforge.training.gan_task import describe_doctor
from ganforge.training.models import ModelSpec
from ganforge.training.task import SCHEDULES, Task, option

# ContextEncoder and ContextEncoderConfig (inpaint_nets.py) are part of this module's interface:
# export, the benchmarks and the tests import them from here, beside the trainer's config
__all__ = ["ContextEncoder", "ContextEncoderConfig", "InpaintTask", "InpaintTrainConfig", "MODEL", "VAL_SETTINGS",
           "Validation", "completed", "train_inpainter"]


@dataclass
class InpaintTrainConfig(GANOptions):
    """Context encoder training: the engine's settings, the doctor's, and these."""
    data: str = option("photos", "photos (scikit-image's training split), a folder of images, or a "
                       ".txt / .jsonl list of image paths (streamed)")
    steps: int = option(2000, "optimizer steps of D and F each", min=1)
    batch_size: int = option(16, "global batch size, split evenly across the ranks", min=2)
    tile: int = option(64, "training crop side, a multiple of 4", min=16)
    lambda_rec: float = option(0.999, "weight of L_rec, the masked L2 over the hole", min=0)
    lambda_adv: float = option(0.001, "weight of L_adv, the adversarial loss", min=0)
    lr: float = option(5e-4, "F's Adam learning rate; D's is a fifth of it", min=0)
    lr_schedule: str = option("cosine", "learning rate over the run: constant, cosine (to --lr-floor), "
                              "linear-decay (hold, then to --lr-floor over the second half)", choices=SCHEDULES)
    lr_floor: float = option(0.05, "the learning rate falls no lower than this share of --lr", min=0, max=1)
    # one bad batch cannot throw F off; D is not clipped
    grad_clip: float = option(1.0, "clip F's gradient norm to this (0: off); D's is not clipped", min=0)
    doctor_every: int = option(100, "steps between s_G / s_D measurements on the held-out batch", min=1)
    pool: int = option(4096, "bundled photos: training crops drawn once per run; with --head blend, "
                       "crop-mask pairs whose fills are computed once", min=1)
    rec_reduce: str = option("pixels", "how L_rec weighs a batch's holes: pooled over pixels, each image's "
                             "hole MSE averaged, or each image's log hole MSE averaged (mean hole PSNR)",
                             choices=REC_REDUCTIONS)
    balance_fills: bool = option(False, "--head blend: draw the training pairs so each candidate fill is the "
                                 "best one (lowest hole MSE) in an equal share of them")
    val_every: int = option(0, "score hole PSNR on the validation photos (docs/inpainting.md) every N steps "
                            "and keep the best-scoring weights (0: keep the last)", min=0)
    val_crops: int = option(96, "--val-every: validation crops per mask type", min=1)
    network: ContextEncoderConfig = option(default_factory=ContextEncoderConfig)

    def validate(self) -> None:
        if self.tile % 4:
            raise UsageError(f"--tile: {self.tile} is not allowed; must be a multiple of 4")
        if self.lr <= 0:
            raise UsageError(f"--lr: {self.lr!r} is not allowed; must be > 0")
        if self.lambda_rec + self.lambda_adv <= 0:
            raise UsageError(f"--lambda-rec: {self.lambda_rec!r} is not allowed with --lambda-adv "
                             f"{self.lambda_adv!r}; the two must not both be 0")
        if self.balance_fills and self.network.head != "blend":
            raise UsageError(f"--balance-fills: not allowed with --head {self.network.head}; "
                             f"it needs --head blend")
        check_network(self.network)


VAL_SETTINGS = ("centre25", "freeform")


class Validation:
    """Hole PSNR on crops of the validation photos (`datasets.VALIDATION_PHOTOS`: never trained
    on, never part of the held-out test), each with a centre 25 % hole and with seeded free-form
    strokes, measured as the inpainting benchmark measures it: uint8 answers, each crop's PSNR
    over its hole, the mean over crops. Its `score` is the mean over the two mask types. For a
    blend the candidate fills and band errors are computed once here, on F's device."""

    def __init__(self, cfg: InpaintTrainConfig, G: ContextEncoder):
        t, dev = cfg.tile, next(G.parameters()).device
        crops = datasets.random_crops(datasets.validation_photos(), cfg.val_crops, t, seed=cfg.seed + 104729,
                                      scale=(0.2, 0.6))
        self.sets = {}
        for setting in VAL_SETTINGS:
            ms = (np.stack([maskgen.centre(t, t, 0.25)] * len(crops)) if setting == "centre25"
                  else np.stack([maskgen.strokes(t, t, 8000 + i) for i in range(len(crops))]))
            x = to_tensor(crops).to(dev)
            m = torch.from_numpy(ms).float().div(255)[:, None].to(dev)
            pre = pair_fills(G, crops, ms, False, dtype=torch.float32) if G.cfg.head == "blend" else None
            self.sets[setting] = (crops, ms > 0, x, m, pre)

    def __call__(self, G: ContextEncoder) -> dict:
        out = {}
        with torch.no_grad():
            for setting, (crops, hole, x, m, pre) in self.sets.items():
                pred = G.blend(pre[0], m, pre[1]) if pre is not None else G(x * (1 - m), m)
                got = to_uint8(completed(x, pred.float(), m))
                # a crop answered exactly counts 99 dB, as in the benchmark
                out[setting] = round(float(np.mean([min(psnr(g[h], c[h]), 99.0) for g, c, h in zip(got, crops, hole)])), 3)
        out["score"] = round(float(np.mean([out[s] for s in VAL_SETTINGS])), 3)
        return out


def _doctor(cfg: InpaintTrainConfig, dev: torch.device, log: bool):
    """The doctor on a fixed held-out batch: real = held-out crops; its `z` = the masked inputs
    (image and mask stacked); `watched(G)` = the completions F gives for them."""
    held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 32, cfg.tile, seed=cfg.seed + 7919)
    x = to_tensor(held).to(dev)
    m = torch.from_numpy(np.stack([maskgen.mixed(cfg.tile, cfg.tile, 9000 + i) for i in range(32)])).float().div(255)
    m = m[:, None].to(dev)

    def watched(G):
        return lambda z: completed(x, G(z[:, :3], z[:, 3:]), z[:, 3:])
    return GANDoctor(cfg, x, torch.cat([x * (1 - m), m], dim=1), log=log), watched


class InpaintTask(Task):
    """The context encoder: D on real crops against completions, F on λ_rec L_rec + λ_adv L_adv.
    A blend learns on crop-mask pairs whose candidate fills are computed once (they have no
    learned parameters); a residual model on crops of the training photos and masks drawn per
    item. With --val-every, rank 0 scores F on the validation photos and the best-scoring
    step's weights are what the final checkpoint holds."""

    kind = "inpainter"

    def __init__(self, cfg: InpaintTrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress
        self.first: dict | None = None      # validation of the untrained start: the reference
        self.best: dict | None = None       # the best validated step: score, step, weights of F and D

    def setup(self, eng: Engine) -> None:
        cfg, net, dev = self.cfg, self.cfg.network, eng.device
        torch.manual_seed(cfg.seed)
        self.G, self.D = ContextEncoder(net).to(dev), Critic(net)
        self.D_train = eng.wrap(self.D)
        self.blend = net.head == "blend"
        # a blend trains its weights network on precomputed fills; a residual model trains F whole
        self.G_train = eng.wrap(self.G.blend if self.blend else self.G)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.lr * 0.2, betas=(0.5, 0.999))
        self.nets, self.opts = {"net": self.G, "D": self.D}, {"net": self.opt_G, "D": self.opt_D}
        crops = image_crops(cfg.data, max(cfg.pool, cfg.batch_size), cfg.tile, cfg.seed, (0.1, 0.6))
        if self.blend:   # one mask per crop: the pairs' fills have no learned parameters, computed once here
            pool, bad = crop_pool(crops, max(cfg.pool, cfg.batch_size))
            for path, why in bad:
                eng.bad_files.setdefault(path, why)
            masks = np.stack([maskgen.mixed(cfg.tile, cfg.tile, s) for s in range(len(pool))])
            self.fill_pool, self.error_pool = pair_fills(self.G, pool, masks, self.progress and eng.main)
            self.winners = fill_winners(pool, masks, self.fill_pool)
            self.crop_pool = torch.from_numpy(pool).to(dev)
            self.mask_pool = torch.from_numpy(masks).to(dev)
            draw = balanced_draw(self.winners, self.fill_pool.shape[1]) if cfg.balance_fills else None
            self.data = PairDraw(len(pool), cfg.seed, draw)
        else:
            self.data = HoledCrops(crops, cfg.tile, cfg.seed)
        self.watch, self.watched = _doctor(cfg, dev, log=self.progress and eng.main)
        if eng.main:     # the picture of held-out crops, and the validation, are rank 0's alone
            held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 8, cfg.tile, seed=1)
            m = np.stack([maskgen.mixed(cfg.tile, cfg.tile, 5000 + i) for i in range(8)])
            self.held = (held, to_tensor(held).to(dev), torch.from_numpy(m).float().div(255)[:, None].to(dev))
            if cfg.val_every:
                with rank_local():
                    self.validation = Validation(cfg, self.G)
                    self.first = self.validation(self.G)

    def dataset(self):
        return self.data

    def before_step(self, step: int, eng: Engine) -> None:
        f = self.cfg.lr_floor          # the engine set lr = base x schedule; lift it to the floor
        for o in self.opts.values():
            for g in o.param_groups:
                g["lr"] = g["lr"] * (1 - f) + g["base_lr"] * f

    def _complete(self, batch: torch.Tensor, eng: Engine):
        """This rank's crops x, masks m (B, 1, T, T), and F's prediction for them."""
        if self.blend:
            idx, flip, turns = batch.unbind(1)
            x = orient(to_tensor(self.crop_pool[idx]), flip, turns)
            m = orient(self.mask_pool[idx].float().div(255)[:, None], flip, turns)
            # the fills come from symmetric stencils and pyramids: they turn with the image; the
            # band errors, sums over the tile, do not change
            fills = orient(self.fill_pool[idx].float(), flip, turns)
            errors = None if self.error_pool is None else self.error_pool[idx]
            with eng.autocast():
                return x, m, self.G_train(fills, m, errors).float()
        x = to_tensor(batch[..., :3])
        m = batch[..., 3:].permute(0, 3, 1, 2).float().div(255)
        # a prefill's classical solves (hundreds of small steps, CG to 1e-14) need float32
        with eng.autocast() if not self.cfg.network.prefill else contextlib.nullcontext():
            return x, m, self.G_train(x * (1 - m), m).float()

    def _rec(self, pred: torch.Tensor, x: torch.Tensor, m: torch.Tensor, eng: Engine) -> torch.Tensor:
        """L_rec of the global batch: each rank's masked MSE weighted by its share of the batch's
        hole pixels (or holed images), so the ranks' mean is the loss of the whole batch."""
        reduce = self.cfg.rec_reduce
        loss = masked_mse(pred, x, m, reduce)
        if eng.rt.world == 1:
            return loss
        count = 3 * m.sum() if reduce == "pixels" else (m.flatten(1).sum(1) > 0).sum().float()
        mean = eng.rt.mean({"count": count})["count"]
        return loss * (count.clamp(min=1) / max(mean, 1e-12))

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        x, m, pred = self._complete(batch, eng)
        fake = completed(x, pred, m)
        # D: real photos -> 1, completions -> 0
        with eng.autocast():
            d_real, d_fake = self.D_train(x).float(), self.D_train(fake.detach()).float()
            loss_D = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        eng.update(loss_D, self.opt_D, clip=0.0)
        # F: masked L2 over the hole + the adversarial term
        row = paint_update(self, eng, x, m, pred, fake)
        p_real, p_fake = torch.sigmoid(d_real.detach()).mean(), torch.sigmoid(d_fake.detach()).mean()
        return {**row, "loss_D": loss_D.detach(), "s_G": p_fake, "s_D": 0.5 * p_real + 0.5 * (1 - p_fake)}

    def status(self, row: dict) -> str:
        if "l_rec" not in row:
            return ""
        best = f" val {self.best['score']:.2f} dB @ {self.best['step']}" if self.best else ""
        return f"l_rec {row['l_rec']:.4f} l_adv {row['l_adv']:.3f}{best}"

    # -- the doctor, and the validation (both measured on rank 0) --
    def _validation_due(self, step: int) -> bool:
        return bool(self.cfg.val_every) and (step % self.cfg.val_every == 0 or step == self.cfg.steps)

    def doctor_due(self, step: int) -> bool:
        return self.watch.due(step) or self._validation_due(step)

    def doctor_observe(self, step: int) -> dict:
        row = {}
        if self.watch.due(step):
            row.update(self.watch.observe(step, self.D, self.watched(self.G), self, {}))
        if self._validation_due(step):
            v = self.validation(self.G)
            row.update({f"val_{k}": score for k, score in v.items()})
            if self.best is None or v["score"] > self.best["score"]:
                self.best = {"score": v["score"], "step": step,
                             **{name: {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
                                for name, net in self.nets.items()}}
        return row

    def knobs(self) -> dict:
        return {"lr_d": self.opt_D.param_groups[0]["base_lr"]}

    def set_knob(self, name: str, value: float) -> None:
        if name != "lr_d":
            raise KeyError(name)
        for g in self.opt_D.param_groups:
            g["lr"] = g["base_lr"] = value

    def extra_state(self) -> dict:
        return {"knobs": self.knobs(), "doctor": self.watch.state(),
                "validation": {"first": self.first, "best": self.best}}

    def load_extra_state(self, state: dict) -> None:
        for k, v in state.get("knobs", {}).items():
            self.set_knob(k, v)
        self.watch.load_state(state.get("doctor", {}))
        val = state.get("validation") or {}
        self.first, self.best = val.get("first") or self.first, val.get("best")

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        """Held-out crops, masked, completed by F: three rows of eight."""
        held, x, m = self.held
        return np.concatenate([held, to_uint8(x * (1 - m)), to_uint8(completed(x, self.G(x * (1 - m), m), m))])

    def finish(self, out: Path, eng: Engine) -> dict:
        summary = {}
        if self.best is not None:   # keep the weights that scored best on the validation photos
            for name, net in self.nets.items():
                net.load_state_dict(self.best[name])
            record = {"step": self.best["step"], "first": self.first, "best": self.best["score"]}
            path = eng.checkpoint_path()
            payload = torch.load(path, map_location="cpu", weights_only=True)
            payload["state"] = {name: net.state_dict() for name, net in self.nets.items()}
            payload["validation"] = record
            atomic_save(payload, path)
            summary.update(selected_step=self.best["step"], val_psnr=self.best["score"],
                           val_psnr_untrained=self.first["score"])
        if self.blend:
            summary["fill_wins"] = np.bincount(self.winners, minlength=3).tolist()
        grid = save_grid(self.samples(), out / "samples.png", nrow=8)
        return {"samples": str(grid), **summary,
                **self.watch.report(out, f"context encoder on {self.cfg.data}, {eng.step} steps")}


def train_inpainter(cfg: InpaintTrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train the context encoder into run directory `out`; return the engine's summary."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(InpaintTask(cfg, progress))


def _describe(s: dict) -> list[str]:
    lines = []
    if "fill_wins" in s:
        lines.append("best fill per training pair (thin plate, converged thin plate, cascade): "
                     + ", ".join(str(n) for n in s["fill_wins"]))
    if "selected_step" in s:
        lines.append(f"validation: kept step {s['selected_step']} at {s['val_psnr']:.3f} dB mean hole PSNR "
                     f"(untrained {s['val_psnr_untrained']:.3f} dB)")
    return lines + describe_doctor(s)


MODEL = ModelSpec("inpainter", InpaintTrainConfig, train_inpainter, _describe)
