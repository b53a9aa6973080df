"""What the doctor does to a network in auto mode, beyond turning knobs: a restart with a
changed architecture, and keeping the best weights seen.

A restart (Doctor.pending -> Engine.rebuild -> the task's `rebuild`) builds the networks with
the decided changes (more or fewer filters, a larger z, a minibatch-std layer) and fills them
from the last checkpoint kept before the failure began:

    kept = transplant(new_net, payload["state"]["D"])     # {"equal": n, "sliced": n, "fresh": n}

a tensor of the same shape is copied; a resized one (filters halved or doubled, z grown) gets
the overlapping slice, the rest keeps its fresh initialisation; a tensor the checkpoint lacks
stays fresh. The optimizers are rebuilt (Adam's moments do not carry over to other shapes).

`dropout_control(D)` gives every D the course's "dropout in D": D's own dropout layers when
it was built with them (the DCGAN, the 2-D mixtures' D), otherwise dropout inserted after its
hidden activations by forward hooks, its rate 0 until the doctor raises it.

`BestWeights` follows the doctor's quality figure (`fd`, lower is better) and holds a copy of
the networks where it was lowest, so a run that degrades late can end on its best weights.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

KEEP_MARGIN = 0.1   # the final weights give way to the best when their fd is > best x (1 + this)


@torch.no_grad()
def transplant(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Copy `state` (another network's state_dict) into `net` wherever shapes allow; returns how
    many tensors were copied whole, copied as an overlapping slice, and left as initialised."""
    counts = {"equal": 0, "sliced": 0, "fresh": 0}
    own = net.state_dict()
    for key, mine in own.items():
        old = state.get(key)
        if old is None or old.dim() != mine.dim():
            counts["fresh"] += 1
            continue
        if old.shape == mine.shape:
            mine.copy_(old)
            counts["equal"] += 1
            continue
        # (out, in, kh, kw) and the like: the leading part of every axis
        region = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, mine.shape))
        mine[region] = old[region].to(mine.dtype)
        counts["sliced"] += 1
    return counts


class BestWeights:
    """The networks' state where the doctor's `fd` was lowest (copies on the CPU)."""

    def __init__(self):
        self.step: int | None = None
        self.fd = float("inf")
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.aside: dict = {}

    def offer(self, step: int, fd: float | None, nets: dict[str, nn.Module], aside: dict | None = None) -> bool:
        """Keep `nets` when `fd` is the lowest so far, with `aside` (the task's own state that
        goes with the weights, e.g. ProGAN's fade-in); True if kept."""
        if fd is None or not fd < self.fd:
            return False
        self.step, self.fd, self.aside = int(step), float(fd), dict(aside or {})
        self.state = {name: {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                      for name, net in nets.items()}
        return True

    def reset(self) -> None:
        """Forget (the networks changed shape: a restart)."""
        self.__init__()

    def better_than(self, final_fd: float | None, margin: float = KEEP_MARGIN) -> bool:
        """Whether the final weights, measured `final_fd`, are measurably worse than the best."""
        return (self.step is not None and final_fd is not None
                and final_fd > self.fd * (1.0 + margin))

    def restore(self, nets: dict[str, nn.Module]) -> None:
        for name, net in nets.items():
            net.load_state_dict(self.state[name])

    def to_state(self) -> dict:
        return ({"step": self.step, "fd": self.fd, "state": self.state, "aside": self.aside}
                if self.step is not None else {})

    def load(self, saved: dict) -> None:
        if saved:
            self.step, self.fd, self.state = saved["step"], saved["fd"], saved["state"]
            self.aside = saved.get("aside", {})


class InsertedDropout:
    """Dropout after each of `sites` (default: D's LeakyReLU modules) for a D built without it:
    a forward hook on each, so D's weights, its state_dict and its export are unchanged. The
    rate (`dropout`) is the doctor's knob; at 0 the hooks pass their input through."""

    def __init__(self, D: nn.Module, sites: Iterable[nn.Module] | None = None):
        self.dropout = 0.0
        self.sites = list(sites) if sites is not None else [m for m in D.modules() if isinstance(m, nn.LeakyReLU)]
        if not self.sites:
            raise ValueError(f"{type(D).__name__} has no site for dropout (no LeakyReLU module)")
        for m in self.sites:
            m.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, self.dropout, module.training) if self.dropout else output

    def set_dropout(self, p: float) -> None:
        self.dropout = float(p)


def dropout_control(D: nn.Module, sites: Iterable[nn.Module] | None = None):
    """What turns D's dropout: D itself when it has dropout layers of its own (`set_dropout`,
    `dropout`), else an InsertedDropout over `sites`."""
    if hasattr(D, "set_dropout") and hasattr(type(D), "dropout"):
        return D
    return InsertedDropout(D, sites)
