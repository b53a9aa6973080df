"""Run under torchrun by tests/training/test_engine.py: train a model through the engine on this
rank, then write what this rank holds (weights, the doctor's knobs, the summary) to
`<out>/rank<R>.pt`, so a test can compare the ranks with each other and with one process.

    torchrun --nproc-per-node 2 tests/training/ddp_worker.py MODEL OUT RESULTS_DIR JSON_OVERRIDES
"""

import json
import os
import sys
from pathlib import Path

import torch

from ganforge.training import models, options
from ganforge.training.distributed import exit_after_group
from ganforge.training.engine import Engine


def main() -> None:
    model, out, results, overrides = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    spec = models.get(model)
    cfg = options.config_from(spec.config, model, overrides=overrides)
    task_cls = {"dcgan": "DCGANTask", "denoiser": "DenoiserTask", "inpainter": "InpaintTask",
                "progan": "ProGANTask", "mlpgan": "MixtureTask", "pix2pix": "Pix2PixTask",
                "context-encoder": "ContextEncoderTask"}[model]
    import importlib

    task = getattr(importlib.import_module(models.REGISTRY[model][0]), task_cls)(cfg)
    summary = Engine(cfg, out, progress=False, resume=bool(os.environ.get("RESUME"))).fit(task)
    rank = int(os.environ.get("RANK", 0))
    results.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {n: net.state_dict() for n, net in task.nets.items()}, "knobs": task.knobs(),
                "summary": json.loads(json.dumps(summary, default=str))}, results / f"rank{rank}.pt")
    exit_after_group(0)


if __name__ == "__main__":
    main()
