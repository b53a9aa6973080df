"""Generators to ONNX with uint8 NHWC images baked into the graph, checked against torch."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class UInt8Images(nn.Module):
    """Wrap a network that returns float NCHW in [-1, 1] so the graph returns uint8 NHWC 0-255:
    clients send and receive bytes. Same arithmetic as `training.loop.to_uint8`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)                                   # (B, C, H, W) in [-1, 1]
        y = torch.clamp(torch.round((y + 1.0) * 127.5), 0.0, 255.0)
        return y.to(torch.uint8).permute(0, 2, 3, 1)      # (B, H, W, C) uint8


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                output_names: list[str], path: str | Path, max_batch_size: int,
                stride: int | None = None) -> Path:
    """Export `module` (eval mode) with a dynamic first (batch) dimension on every input.

    Args:
        stride: None for fixed image sizes; else axes 1 and 2 (height, width of NHWC images)
            of every input are dynamic too, one height and one width shared by all inputs,
            each a multiple of `stride` (the network's total downsampling).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=max(max_batch_size, 2))
    axes = {0: batch}
    if stride is not None:
        # a multiple of the stride, declared as stride x blocks so the exporter can prove the
        # U-Net's skips line up; at stride 1 a side of at least 2 (torch specializes 0 and 1)
        if stride > 1:
            height = stride * torch.export.Dim("height_blocks", min=1)
            width = stride * torch.export.Dim("width_blocks", min=1)
        else:
            height, width = torch.export.Dim("height", min=2), torch.export.Dim("width", min=2)
        axes.update({1: height, 2: width})
    dynamic_shapes = tuple(dict(axes) for _ in input_names)  # positional, matches `example`
    with torch.no_grad():
        program = torch.onnx.export(module, example, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes,
                                    dynamo=True, verbose=False)
    program.save(str(path))
    return path


def parity(module: nn.Module, onnx_path: str | Path, feeds: dict[str, np.ndarray],
           torch_inputs: dict[str, np.ndarray] | None = None) -> dict:
    """Run torch and ONNX Runtime on the same inputs; report the max abs difference in grey
    levels and the share of pixels that differ at all. `torch_inputs`, when the graph computes
    the module's inputs itself (seed -> latent), are what the module is given instead."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = module.eval()(*(torch.from_numpy(v) for v in (torch_inputs or feeds).values())).numpy()
        t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = sess.run(None, feeds)[0]
    t_ort = time.perf_counter() - t0
    diff = np.abs(ref.astype(np.int16) - got.astype(np.int16))
    return {"batch": int(next(iter(feeds.values())).shape[0]), "max_abs_diff": int(diff.max()),
            "pixels_differing": float((diff > 0).mean()), "torch_s": round(t_torch, 4),
            "onnxruntime_s": round(t_ort, 4)}
