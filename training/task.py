"""What a model brings to the training engine (engine.py): its config and its Task.

A model's config is a dataclass that extends `RunConfig`, the settings every model shares, each
field declared with `option(...)` so that it is a command-line flag too (options.py). Its `Task`
holds the networks, optimizers, data set and step function, and the hooks the engine calls
around them. The contract is apart from the engine so that a model's author reads it without
the loop that runs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ganforge.errors import UsageError
from ganforge.training.distributed import PRECISIONS

if TYPE_CHECKING:
    from ganforge.training.engine import Engine

SCHEDULES = ("constant", "cosine", "linear-decay")


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           flag: str | None = None, choices: tuple | None = None, cli: bool = True, **checks) -> Any:
    """A config field that is also a command-line option: its default, its --help text, the
    values it allows (`choices`, `min`, `max`, `below`), its flag name (default --field-name);
    `cli=False` keeps it out of the command line (set by presets or code only)."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli, **checks}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """The settings every model's training shares (the engine's); a model's config extends it."""
    steps: int = option(1000, "optimizer steps", min=1)
    batch_size: int = option(64, "global batch size, split evenly across the ranks", min=1)
    seed: int = option(0, "seed of weights, data order, augmentations and noise", min=0)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    precision: str = option("auto", "fp32, bf16 or fp16 (with a gradient scaler); auto: bf16 on a "
                            "CUDA device that supports it, fp32 elsewhere", choices=PRECISIONS)
    workers: int = option(0, "DataLoader worker processes per rank decoding images (0: in the "
                          "training process)", min=0)
    threads: int = option(0, "torch threads per rank (0: this rank's share of the cores)", min=0)
    log_every: int = option(25, "steps between metrics.jsonl rows", min=1)
    sample_every: int = option(500, "steps between sample grids", min=1)
    checkpoint_every: int = option(500, "steps between checkpoints (and always at the end)", min=1)
    grad_clip: float = option(0.0, "clip each network's gradient norm to this (0: off)", min=0)
    lr_schedule: str = option("constant", "learning rate over the run: constant, cosine (to 0), "
                              "linear-decay (hold, then to 0 over the second half)", choices=SCHEDULES)
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across ranks (slower; a "
                           "multi-rank run then matches a 1-process run)")

    def check(self) -> None:
        """Refuse out-of-range settings, each with a UsageError naming its flag (options.py)."""
        from ganforge.training.options import check_config
        check_config(self)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate at `step` (0-based, before the step) as a share of the base rate."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    if schedule == "linear-decay":   # hold for the first half, then fall linearly to 0 (pix2pix)
        half = steps / 2
        return 1.0 if step < half else max(0.0, 1.0 - (step - half) / (steps - half))
    raise UsageError(f"--lr-schedule: {schedule!r} is not allowed; must be one of {', '.join(SCHEDULES)}")


class Task:
    """A model's part of training. Subclasses set `kind` and implement `setup`, `dataset` and
    `step`; the rest has defaults a model overrides when it has something to say."""

    kind = "model"
    nets: dict[str, nn.Module]            # the networks saved in checkpoints (raw, unwrapped)
    opts: dict[str, torch.optim.Optimizer]

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # required
    def setup(self, eng: "Engine") -> None:
        """Build networks (on eng.device, wrapped for training with eng.wrap) and optimizers."""
        raise NotImplementedError

    def dataset(self) -> torch.utils.data.Dataset:
        """The training items; indexed by (index, epoch) (data.py)."""
        raise NotImplementedError

    def step(self, batch: torch.Tensor, eng: "Engine") -> dict[str, torch.Tensor]:
        """One training step on this rank's slice of the global batch; returns scalars to log."""
        raise NotImplementedError

    # optional
    def network_config(self):
        """The config dataclass export rebuilds the networks from."""
        return self.cfg.network

    def before_step(self, step: int, eng: "Engine") -> None:
        """Called before each step (ProGAN's stage schedule)."""

    def after_step(self, step: int, eng: "Engine") -> None:
        """Called after each optimizer step (weight averages)."""

    def samples(self) -> np.ndarray | None:
        """uint8 NHWC images for the sample grid, or None."""
        return None

    def status(self, row: dict) -> str:
        return " ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))

    # the doctor (GANs)
    def doctor_due(self, step: int) -> bool:
        return False

    def doctor_observe(self, step: int) -> dict:
        """Measure and diagnose on rank 0; return the record fields to log."""
        return {}

    def knobs(self) -> dict:
        return {}

    def set_knob(self, name: str, value: float) -> None:
        raise KeyError(name)

    # a restart with changed networks (the doctor in auto mode, training/remedies.py)
    rewind_keep = 0     # checkpoints kept to rewind to (rewind/step_N.pt); 0: none, no restarts

    def restart_decision(self) -> dict | None:
        """On rank 0 after `doctor_observe`: a network change to make now, {"onset": the step
        the failure began, "changes": {...}, ...}, or None."""
        return None

    def rebuild(self, eng: "Engine", payload: dict, decision: dict) -> None:
        """Build the networks with `decision["changes"]`, filled from checkpoint `payload`, wrap
        them (eng.wrap) and rebuild the optimizers; on every rank."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Plain values the task needs on resume (the doctor's records), saved in checkpoints."""
        return {}

    def checkpoint_fields(self) -> dict:
        """Plain values recorded at the checkpoint's top level, beside the weights, for readers
        of the weights (export: ProGAN's stage and alpha)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def finish(self, out: Path, eng: "Engine") -> dict:
        """After the last step, on rank 0: reports, pictures; returns fields for the summary."""
        return {}
