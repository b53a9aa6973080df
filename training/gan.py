"""DCGAN (Radford et al., 2016) for images, and the checkpoint format every ganforge network uses.

A checkpoint is a plain dict saved with torch.save and read back with `weights_only=True`:
no pickled code, only tensors and primitives. It carries the network's config dataclass, so
export rebuilds the network from the file alone, without the training flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ganforge.errors import CheckpointError

CHECKPOINT_FORMAT = "ganforge-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class DCGANConfig:
    z_dim: int = 64           # latent dimension of G's input
    ngf: int = 32             # G filters in the last hidden block (doubles per block towards 4x4)
    ndf: int = 32             # D filters in the first block (doubles per block towards 4x4)
    resolution: int = 64      # output side in pixels, a power of two >= 8
    channels: int = 3         # image channels
    d_dropout: float = 0.0    # dropout after each D block (a remedy when D dominates)
    mbstd: bool = False       # minibatch standard deviation channel before D's last layer

    def __post_init__(self):
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {self.resolution}")
        for name in ("z_dim", "ngf", "ndf", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.d_dropout < 1.0:
            raise ValueError(f"d_dropout must be in [0, 1), got {self.d_dropout}")

    @property
    def n_blocks(self) -> int:
        return int(math.log2(self.resolution)) - 2  # 4x4 -> resolution in doublings


class Generator(nn.Module):
    """z (B, z_dim) -> image (B, C, R, R) in [-1, 1]."""

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.ngf * 2 ** (cfg.n_blocks - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.z_dim, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        # state size. (ngf * 2^(n_blocks-1)) x 4 x 4
        for _ in range(cfg.n_blocks - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
            # state size. ch x (2x side) x (2x side)
        # state size. ngf x R/2 x R/2
        layers += [nn.ConvTranspose2d(ch, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        # state size. C x R x R
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.cfg.z_dim, 1, 1))


class LeakyDropout(nn.Module):
    """LeakyReLU 0.2, then channel dropout with a rate `p` changeable on the fly (0: none).
    No parameters: D's state_dict keys are the same whatever its dropout."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.leaky_relu(x, 0.2, inplace=True)
        return nn.functional.dropout2d(x, self.p, self.training) if self.p else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


def minibatch_std(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C+1, H, W): the mean over features of the batch's standard
    deviation, as one more constant channel (Karras et al. 2018)."""
    s = x.float().std(0, unbiased=False).mean().to(x.dtype)
    return torch.cat([x, s.expand(x.shape[0], 1, *x.shape[2:])], dim=1)


class Discriminator(nn.Module):
    """image (B, C, R, R) in [-1, 1] -> logit (B,). D's probability is sigmoid(logit)."""

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.ndf
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, ch, 4, 2, 1, bias=False),
                                   LeakyDropout(cfg.d_dropout)]
        # state size. ndf x R/2 x R/2
        for _ in range(cfg.n_blocks - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2),
                       LeakyDropout(cfg.d_dropout)]
            ch *= 2
            # state size. ch x (side/2) x (side/2)
        # state size. (ndf * 2^(n_blocks-1)) [+1 with mbstd] x 4 x 4
        layers.append(nn.Conv2d(ch + int(cfg.mbstd), 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)
        self._register_load_state_dict_pre_hook(self._renumber)

    def _renumber(self, state, prefix, *_args) -> None:
        """Read the weights of a D built with separate dropout layers (which took indices of
        `main`): each layer's tensors moved, in order, to its index here."""
        head = prefix + "main."
        keys = [k for k in state if k.startswith(head)]
        found = sorted({int(k[len(head):].split(".")[0]) for k in keys})
        ours = [i for i, m in enumerate(self.main) if m.state_dict()]
        if found == ours or len(found) != len(ours):
            return
        remap = dict(zip(found, ours))
        for k in keys:
            idx, _, rest = k[len(head):].partition(".")
            state[f"{head}{remap[int(idx)]}.{rest}"] = state.pop(k)

    def set_dropout(self, p: float) -> None:
        """Change D's dropout on the fly (the doctor's remedy)."""
        for m in self.modules():
            if isinstance(m, LeakyDropout):
                m.p = p

    @property
    def dropout(self) -> float:
        return next(m.p for m in self.modules() if isinstance(m, LeakyDropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.main[:-1](x)
        if self.cfg.mbstd:
            h = minibatch_std(h)
        return self.main[-1](h).view(x.shape[0])


def init_weights(m: nn.Module) -> None:
    """DCGAN's init: conv weights N(0, 0.02), batch-norm scale N(1, 0.02), shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Checkpoints

CONFIGS: dict[str, type] = {"dcgan": DCGANConfig}


def save_checkpoint(path: str | Path, kind: str, config, networks: dict[str, nn.Module],
                    **extra) -> Path:
    """Write a checkpoint: kind, config dataclass (as a dict), state dicts, and extras (step,
    data, training settings) that must be plain values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": kind,
        "config": dataclasses.asdict(config),
        "state": {name: net.state_dict() for name, net in networks.items()},
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, kinds: tuple[str, ...] | None = None) -> dict:
    """Read a ganforge checkpoint; raise CheckpointError naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise CheckpointError(f"checkpoint: {path} is not a ganforge checkpoint "
                              f"(torch.load failed: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint: {path} is not a ganforge checkpoint "
                              f"(no '{CHECKPOINT_FORMAT}' format marker)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint: {path} has format version {payload.get('version')!r}; "
                              f"this ganforge reads version {CHECKPOINT_VERSION}")
    if kinds is not None and payload.get("kind") not in kinds:
        raise CheckpointError(f"checkpoint: {path} holds a {payload.get('kind')!r} model; "
                              f"expected one of {', '.join(kinds)}")
    payload["path"] = str(path)
    return payload


def config_from_checkpoint(payload: dict):
    cls = CONFIGS[payload["kind"]]
    return cls(**payload["config"])


def build_dcgan(payload: dict) -> tuple[Generator, Discriminator]:
    """Rebuild G and D from a checkpoint payload, weights loaded, in eval mode."""
    cfg = config_from_checkpoint(payload)
    G, D = Generator(cfg), Discriminator(cfg)
    G.load_state_dict(payload["state"]["G"])
    D.load_state_dict(payload["state"]["D"])
    return G.eval(), D.eval()


# ---------------------------------------------------------------------------------------------
# Dropout that several ranks draw as one process does

class SharedDropout(nn.Dropout):
    """Dropout whose keep-mask a trainer may hand in (`keep`, bool, shaped like the input): drawn
    for the whole global batch from the generator every rank shares, each rank keeping its slice
    (`dropout_masks`), so that several ranks drop what one process would. Without a mask, and
    in eval mode, it is plain nn.Dropout (no parameters: checkpoints and exports are unchanged)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self.keep: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.keep is not None:
            return x * self.keep.to(x.dtype) / (1.0 - self.p)
        return super().forward(x)


@contextlib.contextmanager
def dropout_masks(layers: list[tuple[SharedDropout, tuple[int, ...]]], n: int, rand):
    """For one forward pass: each layer's keep-mask for `n` items of its input shape, from
    `rand(n, *shape)` (uniform in [0, 1): the engine's `rand`, this rank's slice)."""
    for layer, shape in layers:
        if layer.p > 0:
            layer.keep = rand(n, *shape) >= layer.p
    try:
        yield
    finally:
        for layer, _ in layers:
            layer.keep = None


# ---------------------------------------------------------------------------------------------
# The small MLP GAN for 2-D mixtures (the mode-collapse benchmarks of VEEGAN and PacGAN)

@dataclass(frozen=True)
class MLPGANConfig:
    z_dim: int = 2            # latent dimension of G's input
    ngf: int = 128            # G hidden units per layer
    ndf: int = 128            # D hidden units per layer
    g_layers: int = 4         # hidden layers of G (as PacGAN's 2-D G)
    d_layers: int = 3         # hidden layers of D (as PacGAN's 2-D D)
    pack: int = 1             # samples D judges jointly (PacGAN, Lin et al. 2018); 1 = plain GAN
    d_dropout: float = 0.0    # dropout after each D hidden layer (changeable on the fly)
    dim: int = 2              # data dimension

    def __post_init__(self):
        for name in ("z_dim", "ngf", "ndf", "g_layers", "d_layers", "pack", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.d_dropout < 1.0:
            raise ValueError(f"d_dropout must be in [0, 1), got {self.d_dropout}")


class MLPGenerator(nn.Module):
    """z (B, z_dim) -> point (B, dim)."""

    def __init__(self, cfg: MLPGANConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.z_dim
        for _ in range(cfg.g_layers):
            layers += [nn.Linear(width, cfg.ngf), nn.BatchNorm1d(cfg.ngf), nn.ReLU(True)]
            width = cfg.ngf
        layers.append(nn.Linear(width, cfg.dim))
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class MLPDiscriminator(nn.Module):
    """points (B, dim) -> logit (B,); with pack m, B must divide by m and each of the B/m packs
    of consecutive samples gets one logit, repeated for its m members (so D(x) keeps shape (B,))."""

    def __init__(self, cfg: MLPGANConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.dim * cfg.pack
        for _ in range(cfg.d_layers):
            # dropout always present (p may be 0) so the doctor can turn it on during training
            layers += [nn.Linear(width, cfg.ndf), nn.LeakyReLU(0.2, True), SharedDropout(cfg.d_dropout)]
            width = cfg.ndf
        layers.append(nn.Linear(width, 1))
        self.main = nn.Sequential(*layers)

    def set_dropout(self, p: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    @property
    def dropout(self) -> float:
        return next(m.p for m in self.modules() if isinstance(m, nn.Dropout))

    def noise(self) -> list[tuple[SharedDropout, tuple[int]]]:
        """Each dropout layer and the shape of one pack's input to it (see `dropout_masks`)."""
        return [(m, (self.cfg.ndf,)) for m in self.main if isinstance(m, SharedDropout)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.cfg.pack
        assert x.shape[0] % m == 0, "batch must divide by pack"
        # (B, dim) -> (B/m, m*dim)
        logit = self.main(x.reshape(x.shape[0] // m, m * x.shape[1])).view(-1)
        return logit.repeat_interleave(m)


CONFIGS["mlpgan"] = MLPGANConfig
