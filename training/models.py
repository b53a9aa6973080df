"""The models `ganforge train` knows: each a module holding its config dataclass (a RunConfig),
its Task, and a `MODEL` entry; presets in presets/<name>/*.toml.

    spec = models.get("dcgan")
    cfg = options.config_from(spec.config, "dcgan", preset_name="demo", overrides={"steps": 10})
    summary = spec.train(cfg, "runs/demo")
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ganforge.errors import UsageError

# name -> (module, one-line description); modules are imported only when the model is asked for
REGISTRY: dict[str, tuple[str, str]] = {
    "dcgan": ("ganforge.training.loop", "DCGAN (Radford et al.) on images, watched by the doctor"),
    "denoiser": ("ganforge.training.autoencoders", "the convolutional (DnCNN-style) denoising autoencoder"),
    "inpainter": ("ganforge.training.inpainting", "the shipped inpainter: a learned per-pixel blend of "
                  "classical fills (thin plate, harmonic cascade)"),
    "context-encoder": ("ganforge.training.context_encoder", "the context encoder: a U-Net that paints the "
                        "hole, masked L2 + adversarial loss (Pathak et al.)"),
    "mae": ("ganforge.training.mae", "a masked autoencoder on the context encoder's U-Net: MSE over hidden "
            "patches; a start for context-encoder --init-from"),
    "progan": ("ganforge.training.progan", "Progressive GAN, grown from 4x4 with fade-in"),
    "mlpgan": ("ganforge.training.mixtures", "a GAN on 2-D mixtures (ring, grid), where modes can be counted"),
    "pix2pix": ("ganforge.training.pix2pix", "pix2pix: U-Net, 70x70 PatchGAN, L1 x 100"),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: type                          # the RunConfig subclass: the model's options
    train: Callable                       # train(cfg, out, progress=True, resume=False) -> summary
    describe: Callable[[dict], list[str]] = lambda summary: []   # extra summary lines


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UsageError(f"model: {name!r} is not allowed; must be one of {', '.join(names())}")
    return importlib.import_module(REGISTRY[name][0]).MODEL
