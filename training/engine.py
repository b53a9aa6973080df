"""The one training loop every ganforge model runs in.

A model brings a `Task`: its networks, optimizers, data set, one step function and (for GANs)
the doctor's hooks. The engine brings everything else, the same for every model:

    device       --device auto|cpu|cuda|cuda:N            (auto: CUDA when present)
    precision    --precision auto|fp32|bf16|fp16          torch.autocast; fp16 with a GradScaler
    processes    torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment): one process per
                 device, each network in DistributedDataParallel, NCCL on GPUs and gloo on CPU
    data         a DataLoader per rank over the task's Dataset: each rank reads its part of every
                 global batch, reshuffled every epoch, decoded in worker processes (data.py)
    schedule     the learning rate of every optimizer, a function of the step
    checkpoints  atomic; networks, optimizers, scaler, RNG states, data position and the
                 doctor's state; `--resume` continues from them on any number of ranks
    SIGTERM      a preempted pod checkpoints and exits 0
    restarts     a task with `rewind_keep` keeps its last checkpoints in rewind/; when it decides
                 a network change (the doctor, auto mode) every rank rebuilds from one of them
                 at the same step (`Engine.rebuild`)
    logs         metrics.jsonl, the progress line, sample grids: rank 0 only

    engine = Engine(cfg, out)            # cfg: the model's config, a RunConfig
    summary = engine.fit(task)

Equal results on any number of ranks: the global batch is the one the user names, split into
contiguous per-rank slices; noise the step draws comes from one generator every rank holds and
each rank keeps its slice (`engine.randn`); per-image augmentations are seeded by the image's
index and the epoch. With synchronised BatchNorm (`--sync-bn`) a run on 2 ranks follows the run
on 1 process up to floating-point summation order.

The process's rank, device, precision and collectives (`Runtime`) and the BatchNorm synchronised
across ranks are in distributed.py; what a model brings (`RunConfig`, `option`, `Task`, the
learning-rate schedules) is in task.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ganforge.errors import CheckpointError, UsageError
from ganforge.images import save_grid
from ganforge.progress import Progress
from ganforge.training.distributed import GroupBatchNorm, Runtime, rank_local, timed_allreduce
from ganforge.training.task import RunConfig, Task, lr_factor


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(payload: dict, path: Path) -> Path:
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a kill at any
    moment leaves either the previous checkpoint or the new one, never a torn file."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


class Engine:
    """Runs a Task: see the module docstring."""

    def __init__(self, cfg: RunConfig, out: str | Path, progress: bool = True, resume: bool = False):
        cfg.check()
        self.cfg, self.out = cfg, Path(out)
        # a multiplier on every learning rate, for a caller that steps the engine on a clock of
        # its own (a benchmark's budgeted schedule); the doctor's rate changes stay in base_lr
        self.lr_scale = 1.0
        self.rt = Runtime(cfg.device, cfg.precision, cfg.threads)
        if cfg.batch_size % self.rt.world:
            raise UsageError(f"--batch-size: {cfg.batch_size} is not allowed on {self.rt.world} ranks; "
                             f"must divide evenly by the number of ranks")
        self.local_batch = cfg.batch_size // self.rt.world
        self.progress, self.resume = progress, resume
        self.device = self.rt.device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.rt.precision == "fp16")
        self.gen = torch.Generator().manual_seed(cfg.seed + 104729)   # the step's noise, same on every rank
        self.step = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.timing = {"data_wait_s": 0.0, "step_s": 0.0, "allreduce_s": 0.0, "timed_steps": 0}
        self.bad_files: dict[str, str] = {}
        self._stop_signal: int | None = None
        if self.rt.main:
            try:
                (self.out / "samples").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"--out: cannot create {self.out} ({exc.strerror})") from exc
            if not os.access(self.out, os.W_OK):
                raise UsageError(f"--out: {self.out} is not writable")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

    @property
    def main(self) -> bool:
        return self.rt.main

    # -- what a task's step uses --

    def wrap(self, net: nn.Module, find_unused: bool = False) -> nn.Module:
        """Move a network to the device; on several ranks, synchronise its BatchNorm (--sync-bn)
        and wrap it in DistributedDataParallel. Returns the module to train through; keep the
        raw one for checkpoints. `find_unused`: some parameters take no part in a step (ProGAN's
        blocks of the stages not yet grown)."""
        net.to(self.device)
        if not self.rt.distributed:
            return net
        if self.cfg.sync_bn:
            if self.device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            else:
                net = GroupBatchNorm.convert(net)
        ddp = nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=not self.cfg.sync_bn, find_unused_parameters=find_unused)
        ddp.register_comm_hook(self, timed_allreduce)
        return ddp

    def randn(self, n: int, *shape: int) -> torch.Tensor:
        """Standard normal noise for this rank's `n` items: drawn for the whole global batch from
        the generator every rank holds, this rank's slice kept (results do not depend on ranks)."""
        full = torch.randn((n * self.rt.world, *shape), generator=self.gen)
        return full[self.rt.rank * n:(self.rt.rank + 1) * n].to(self.device, non_blocking=True)

    def rand(self, n: int, *shape: int) -> torch.Tensor:
        full = torch.rand((n * self.rt.world, *shape), generator=self.gen)
        return full[self.rt.rank * n:(self.rt.rank + 1) * n].to(self.device, non_blocking=True)

    def autocast(self):
        return self.rt.autocast()

    def update(self, loss: torch.Tensor, opt: torch.optim.Optimizer, zero: bool = True,
               clip: float | None = None) -> None:
        """Backward through `loss`, clip (`clip`, default --grad-clip; 0: off), step `opt`
        (scaled in fp16)."""
        if zero:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.cfg.grad_clip if clip is None else clip
        if clip:
            self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(opt)

    # -- checkpoints --

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self, task: Task, final: bool = False) -> Path | None:
        """Rank 0 writes the checkpoint (atomically); every rank waits for it."""
        path = self.checkpoint_path()
        if self.main:
            train = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
            payload = {
                "format": "ganforge-checkpoint", "version": 1, "kind": task.kind,
                "config": dataclasses.asdict(task.network_config()),
                "state": {name: net.state_dict() for name, net in task.nets.items()},
                "step": self.step, "data": getattr(self.cfg, "data", None), "seed": self.cfg.seed,
                "train": train, **task.checkpoint_fields(),
                "resume": {
                    "optimizers": {name: o.state_dict() for name, o in task.opts.items()},
                    "scaler": self.scaler.state_dict(),
                    "rng": rng_state(), "noise": self.gen.get_state(),
                    "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "world_size": self.rt.world, "finished": final,
                    "task": task.extra_state(), "bad_files": self.bad_files,
                },
            }
            atomic_save(payload, path)
            # points to rewind to: the scheduled checkpoints only, so a run stopped by SIGTERM
            # and resumed rewinds where the uninterrupted run does
            if task.rewind_keep and not final and self.step % self.cfg.checkpoint_every == 0:
                self._keep_for_rewind(path, task.rewind_keep)
        self.rt.barrier()
        return path

    # -- rewinding (a restart with changed networks) --

    def rewind_steps(self) -> list[int]:
        """Steps of the checkpoints kept to rewind to, oldest first."""
        return sorted(int(p.stem[5:]) for p in (self.out / "rewind").glob("step_*.pt"))

    def _keep_for_rewind(self, path: Path, keep: int) -> None:
        import shutil

        folder = self.out / "rewind"
        folder.mkdir(exist_ok=True)
        tmp = folder / "partial.pt"
        shutil.copyfile(path, tmp)
        os.replace(tmp, folder / f"step_{self.step:06d}.pt")
        for step in self.rewind_steps()[:-keep]:
            (folder / f"step_{step:06d}.pt").unlink(missing_ok=True)

    def rebuild(self, task: Task, decision: dict) -> None:
        """A restart with changed networks, on every rank at the same step: the kept checkpoint
        of step `decision["from_step"]` is read, the task builds its new networks from it
        (`task.rebuild`), and the step, data position, noise and RNG go back to that checkpoint.
        Only networks, optimizers and position change: the task's knobs stay as they are."""
        from ganforge.training.gan import load_checkpoint

        payload = load_checkpoint(self.out / "rewind" / f"step_{decision['from_step']:06d}.pt", (task.kind,))
        r = payload["resume"]
        task.rebuild(self, payload, decision)
        for o in task.opts.values():
            for g in o.param_groups:
                g.setdefault("base_lr", g["lr"])
        self.scaler.load_state_dict(r["scaler"])
        set_rng_state(r["rng"])
        self.gen.set_state(r["noise"])
        self.step, self.epoch, self.batch_in_epoch = int(payload["step"]), int(r["epoch"]), int(r["batch_in_epoch"])
        self._batch_iter = self._batches(self._dataset)
        if self.main:   # the abandoned steps' checkpoints
            for step in self.rewind_steps():
                if step > self.step:
                    (self.out / "rewind" / f"step_{step:06d}.pt").unlink()

    def consult(self, task: Task, s: int) -> dict:
        """The doctor at step `s`, on every rank: rank 0 measures, diagnoses and remedies; its
        knobs reach every rank, and a restart it decided rewinds every rank (`rebuild`).
        Returns the fields to log (with `rewound_to` after a restart)."""
        row: dict = {}
        if self.main:
            with rank_local():
                row.update(task.doctor_observe(s))
        knobs, decision = self.rt.broadcast(
            (task.knobs(), self._restart_point(task.restart_decision())) if self.main else None)
        if not self.main:
            for k, v in knobs.items():
                task.set_knob(k, v)
        if decision is not None and s < self.cfg.steps:
            self.rebuild(task, decision)
            row.update(restart=decision["changes"], rewound_to=self.step)
        return row

    def _restart_point(self, decision: dict | None) -> dict | None:
        """Rank 0: the decision with the kept checkpoint it rewinds to (the last one before the
        failure's onset; the oldest kept when none is), or None when nothing is kept."""
        steps = self.rewind_steps() if decision else []
        if not steps:
            return None
        before = [s for s in steps if s < decision["onset"]]
        return {**decision, "from_step": before[-1] if before else steps[0]}

    def restore(self, task: Task) -> bool:
        """Load the run's checkpoint into the task (every rank reads the file); False if none."""
        path = self.checkpoint_path()
        if not path.is_file():
            return False
        from ganforge.training.gan import load_checkpoint

        payload = load_checkpoint(path, (task.kind,))
        r = payload.get("resume")
        if r is None:
            raise CheckpointError(f"--resume: {path} holds final weights only (no optimizer state); "
                                  f"start a new run in another --out")
        for name, net in task.nets.items():
            net.load_state_dict(payload["state"][name])
        for name, o in task.opts.items():
            o.load_state_dict(r["optimizers"][name])
        self.scaler.load_state_dict(r["scaler"])
        set_rng_state(r["rng"])
        self.gen.set_state(r["noise"])
        self.step, self.epoch, self.batch_in_epoch = int(payload["step"]), int(r["epoch"]), int(r["batch_in_epoch"])
        self.bad_files = dict(r.get("bad_files", {}))
        task.load_extra_state(r.get("task", {}))
        return True

    # -- signals --

    def _on_signal(self, sig, _frame) -> None:
        self._stop_signal = sig

    @contextlib.contextmanager
    def _signals(self):
        old = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                old[s] = signal.signal(s, self._on_signal)
        except ValueError:       # not the main thread: leave signals alone
            pass
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- the loop --

    def _batches(self, dataset) -> Iterator[torch.Tensor]:
        from ganforge.training import data

        while True:
            loader = data.loader(dataset, self.local_batch, self.cfg.batch_size, self.rt.rank, self.rt.world,
                                 self.cfg.seed, self.epoch, self.batch_in_epoch, self.cfg.workers,
                                 pin=self.device.type == "cuda")
            for images, bad in loader:
                for path, why in bad:
                    self.bad_files.setdefault(path, why)
                yield images
            self.epoch += 1
            self.batch_in_epoch = 0

    def start(self, task: Task, resume: bool = False) -> bool:
        """Set the task up on this rank, restore its checkpoint when `resume` (True if one was
        found), and open its data."""
        task.setup(self)
        for o in task.opts.values():
            for g in o.param_groups:
                g.setdefault("base_lr", g["lr"])
        resumed = resume and self.restore(task)
        self._first_step = self.step
        dataset = task.dataset()
        if len(dataset) < self.cfg.batch_size:
            raise UsageError(f"--batch-size: {self.cfg.batch_size} is more than the {len(dataset)} training "
                             f"items of --data {getattr(self.cfg, 'data', '')!r}")
        self._dataset = dataset
        self._batch_iter = self._batches(dataset)
        if task.rewind_keep and not resumed:    # a new run: its start is the first point to rewind to
            if self.main:
                for step in self.rewind_steps():
                    (self.out / "rewind" / f"step_{step:06d}.pt").unlink()
            self.save(task)
        return resumed

    def one_step(self, task: Task) -> dict[str, torch.Tensor]:
        """One optimizer step of the task: learning rates, the next batch, the step, the timing."""
        factor = lr_factor(self.cfg.lr_schedule, self.step, self.cfg.steps) * self.lr_scale
        for o in task.opts.values():
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * factor
        task.before_step(self.step, self)
        t_data = time.perf_counter()
        batch = next(self._batch_iter).to(self.device, non_blocking=True)
        t_step = time.perf_counter()
        warm = self.step > self._first_step      # the first step of a process (allocations) is not timed
        out = task.step(batch, self)
        self.scaler.update()
        self.step += 1
        self.batch_in_epoch += 1
        task.after_step(self.step, self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if warm:
            self.timing["data_wait_s"] += t_step - t_data
            self.timing["step_s"] += time.perf_counter() - t_step
            self.timing["timed_steps"] += 1
        else:
            self.timing["allreduce_s"] = 0.0
        return out

    def fit(self, task: Task) -> dict:
        """Train the task to `steps`: see the module docstring."""
        cfg, rt = self.cfg, self.rt
        resumed = self.start(task, self.resume)
        if self.resume and rt.main:
            print(f"resuming {task.kind} at step {self.step} from {self.checkpoint_path()}" if resumed
                  else f"--resume: no checkpoint in {self.out}; starting a new run", file=sys.stderr)
        if self.main:
            (self.out / "train.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            metrics_path = self.out / "metrics.jsonl"
            kept = []
            if resumed and metrics_path.is_file():   # rows after the checkpoint are done again
                kept = [ln for ln in metrics_path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
            metrics = open(metrics_path, "a")
        bar = Progress(cfg.steps, f"train {task.kind}", unit="step", enabled=self.progress and self.main,
                       initial=self.step)
        t0 = time.perf_counter()
        row: dict = {}
        interrupted = None
        try:
            with self._signals():
                while self.step < cfg.steps:
                    out = self.one_step(task)
                    s = self.step
                    log_now = s % cfg.log_every == 0 or s == cfg.steps
                    doctor_now = task.doctor_due(s)
                    if log_now or doctor_now:
                        row = {"step": s, **{k: round(v, 6) for k, v in rt.mean(out).items()}}
                    rewound = False
                    if doctor_now:
                        row.update(self.consult(task, s))
                        rewound = "rewound_to" in row
                    if self.main and (log_now or doctor_now):
                        row["seconds"] = round(time.perf_counter() - t0, 3)
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    if self.main and not rewound and (s % cfg.sample_every == 0 or s == cfg.steps):
                        with rank_local():
                            grid = task.samples()
                        if grid is not None:
                            save_grid(grid, self.out / "samples" / f"step_{s:06d}.png", nrow=8)
                    if rt.any(self._stop_signal is not None):
                        interrupted = s
                        break
                    if s % cfg.checkpoint_every == 0 and s != cfg.steps and not rewound:
                        self.save(task)
                    bar.update(self.step - bar.n, status=task.status({k: v for k, v in row.items() if k != "step"}))
        finally:
            bar.close()
            if self.main:
                metrics.close()
        seconds = time.perf_counter() - t0
        ckpt = self.save(task, final=interrupted is None)
        import resource

        summary = {"kind": task.kind, "checkpoint": str(ckpt), "steps": self.step, "seconds": round(seconds, 1),
                   "world_size": rt.world, "device": str(self.device), "precision": rt.precision,
                   "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   **{k: round(v, 4) for k, v in self.timing.items()}}
        summary.update({k: v for k, v in row.items() if k not in ("step", "seconds")})
        bad = {}
        for part in rt.gather(self.bad_files):
            bad.update(part)
        summary["bad_files"] = bad
        if interrupted is not None:
            name = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
            summary["interrupted"] = name
        elif self.main:
            with rank_local():
                summary.update(task.finish(self.out, self))
        if self.main:
            if bad:
                (self.out / "bad_files.json").write_text(json.dumps(bad, indent=2) + "\n")
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        # every rank is past its last collective: the process group goes now, not at interpreter
        # exit, where gloo's threads can be torn down unjoined and abort the rank (SIGABRT)
        rt.barrier()
        rt.close()
        return summary
