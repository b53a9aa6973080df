"""Where a training process runs and how its ranks work together.

`Runtime` is the process's place in a torchrun job (rank and world size from the environment),
its device and precision, its share of the CPU, and the collectives the engine calls (no-ops on
one process). `GroupBatchNorm` takes BatchNorm's statistics over every rank's slice on any
device, except inside `rank_local()`; `timed_allreduce` is the DDP hook that times the
gradient all-reduce. engine.py's `Engine` holds a Runtime (`eng.rt`) and wraps networks with
these.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ganforge.errors import UsageError

if TYPE_CHECKING:
    from ganforge.training.engine import Engine

DEVICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


_JOINED = [False]  # whether this process has been a rank of a process group


def exit_after_group(code: int) -> None:
    """End this process with `code` without Python's finalization when it has been a rank of a
    process group; return otherwise.

    DDP keeps the gloo process group, and with it gloo's worker threads, alive until the
    process ends. A worker thread that releases a finished collective's tensors takes the GIL,
    and one that asks for it while the interpreter finalizes aborts the process ("terminate
    called without an active exception"): exit -6 after a run that saved everything. So a rank
    flushes what finalization would flush and leaves at once."""
    if not _JOINED[0]:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class Runtime:
    """The process's place in the job (rank, world size), its device and its precision."""

    def __init__(self, device: str = "auto", precision: str = "auto", threads: int = 0):
        self.rank = _env_int("RANK", 0)
        self.world = _env_int("WORLD_SIZE", 1)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.local_world = _env_int("LOCAL_WORLD_SIZE", self.world)
        self.device = self._device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = self._precision(precision)
        self._threads(threads)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    device_id=self.device if self.device.type == "cuda" else None)
            _JOINED[0] = True
        self.distributed = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _device(self, name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            return torch.device("cpu")
        if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
            if not torch.cuda.is_available():
                raise UsageError(f"--device: {name!r} is not available here (torch {torch.__version__} "
                                 f"sees no CUDA device); use cpu, or install the CUDA build (README)")
            index = self.local_rank if name == "cuda" else int(name[5:])
            if index >= torch.cuda.device_count():
                raise UsageError(f"--device: {name!r} (local rank {self.local_rank}) is not allowed; "
                                 f"this machine has {torch.cuda.device_count()} CUDA devices")
            return torch.device("cuda", index)
        raise UsageError(f"--device: {name!r} is not allowed; must be {DEVICES}")

    def _precision(self, name: str) -> str:
        if name not in PRECISIONS:
            raise UsageError(f"--precision: {name!r} is not allowed; must be one of {', '.join(PRECISIONS)}")
        if name == "auto":
            return "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        return name

    def _threads(self, threads: int) -> None:
        """This rank's threads, and on CPU with several ranks per machine, its own cores."""
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        if self.device.type == "cpu" and self.local_world > 1 and len(cores) >= self.local_world:
            share = len(cores) // self.local_world
            cores = cores[self.local_rank * share:(self.local_rank + 1) * share]
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads or max(1, len(cores)))

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- collectives (no-ops on one process) --

    def mean(self, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """The mean over ranks of each value, one all-reduce for all of them."""
        keys = list(values)
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=self.device).detach().reshape(())
                         for k in keys]) if keys else torch.zeros(0, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world
        return dict(zip(keys, t.cpu().tolist()))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


_GROUP_STATS = [True]


@contextlib.contextmanager
def rank_local():
    """Work one rank does alone (the doctor's measurements, sample grids): BatchNorm takes its
    statistics from this rank's batch, with no collective the other ranks would have to join."""
    _GROUP_STATS.append(False)
    try:
        yield
    finally:
        _GROUP_STATS.pop()


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are taken over every rank's slice of the batch, on any
    device (torch's SyncBatchNorm runs on GPUs only): the sums travel in one differentiable
    all-reduce, so gradients see the global batch too."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _GROUP_STATS[-1] and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        n = torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=x.dtype)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), n.reshape(1)])
        stats = all_reduce(stats)
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = stats[c:2 * c] / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / max(float(count) - 1, 1.0), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm in `module` by a GroupBatchNorm with the same state."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            out.load_state_dict(module.state_dict())
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child))
        return out


def timed_allreduce(eng: Engine, bucket):
    """DDP's all-reduce of one gradient bucket, with the time from the bucket being ready to its
    mean being back (overlapped with the rest of the backward pass) added to the engine's timing."""
    t0 = time.perf_counter()
    group = dist.group.WORLD
    tensor = bucket.buffer().div_(dist.get_world_size(group))
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()

    def done(f):
        eng.timing["allreduce_s"] += time.perf_counter() - t0
        return f.value()[0]

    return fut.then(done)
