"""Image-to-image models (denoiser, inpainter) to ONNX + Triton, uint8 NHWC on both sides.

Denoiser:  image UINT8 [batch, T, T, 3]                     -> denoised UINT8 [batch, T, T, 3]
Inpainter: image UINT8 [batch, T, T, 3], mask UINT8 [batch, T, T, 1] (255 = hole)
                                                             -> inpainted UINT8 [batch, T, T, 3]
The inpainter's compositing is in the graph: outside the hole the output is the input's bytes.
Outputs are named after their data and not `image`: ONNX forbids a graph output named like an
input, and Triton's native onnxruntime backend looks outputs up by their graph names, so the
same name in config.pbtxt and graph keeps one repository valid for both servers.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ganforge.errors import GanforgeError, UsageError
from ganforge import masks as maskgen
from ganforge.masks import MASK_VALUES
from ganforge.export.onnx import export_onnx, parity
from ganforge.serving import repository as repo
from ganforge.serving.repository import tensor

MAX_PARITY_DIFF = 1


def _to_float(image_u8: torch.Tensor) -> torch.Tensor:
    return image_u8.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0   # (B, 3, T, T) in [-1, 1]


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round((x + 1.0) * 127.5), 0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1)


class UInt8Denoise(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return _to_u8(self.net(_to_float(image)))


class UInt8Inpaint(nn.Module):
    """net(masked image, mask) -> full image; known pixels are copied from the input bytes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hole = (mask > 127)                                     # (B, T, T, 1) bool
        m = hole.permute(0, 3, 1, 2).to(torch.float32)          # (B, 1, T, T)
        x = _to_float(image)
        pred = _to_u8(self.net(x * (1.0 - m), m))               # (B, T, T, 3) uint8
        return torch.where(hole, pred, image)


def export_image_model(payload: dict, net: nn.Module, kind: str, repository: str | Path, name: str,
                       tile: int, max_batch_size: int, version: int, instances: int,
                       intra_op_threads: int, source: dict, log=print) -> dict:
    """Export a denoiser (`kind` 'denoise') or an inpainter ('inpaint') as one Triton model."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]{0,63}", name):
        raise UsageError(f"--name: {name!r} is not allowed; use 1-64 letters, digits, '_' or '-', "
                         f"starting with a letter")
    if not 16 <= tile <= 1024 or tile % 8:
        raise UsageError(f"--tile: {tile} is not allowed; must be a multiple of 8 in [16, 1024]")
    if not 1 <= max_batch_size <= 256:
        raise UsageError(f"--max-batch-size: {max_batch_size} is not allowed; must be in [1, 256]")
    repository = Path(repository)
    model_dir = repository / name
    onnx_path = model_dir / str(version) / "model.onnx"
    if onnx_path.parent.exists():
        shutil.rmtree(onnx_path.parent)
    rng = np.random.default_rng(0)
    image = tensor("image", "UINT8", [tile, tile, 3])
    output_name = "denoised" if kind == "denoise" else "inpainted"
    output = tensor(output_name, "UINT8", [tile, tile, 3])
    if kind == "denoise":
        module = UInt8Denoise(net.eval()).eval()
        inputs, names = [image], ["image"]
        feeds = {"image": rng.integers(0, 256, (4, tile, tile, 3), dtype=np.uint8)}
    else:
        module = UInt8Inpaint(net.eval()).eval()
        inputs, names = [image, tensor("mask", "UINT8", [tile, tile, 1])], ["image", "mask"]
        # two centre holes and two free-form strokes: iterative fills must agree on both
        mask = np.zeros((4, tile, tile, 1), np.uint8)
        mask[:2, tile // 4: 3 * tile // 4, tile // 4: 3 * tile // 4] = 255
        mask[2:, ..., 0] = np.stack([maskgen.strokes(tile, tile, seed) for seed in (1, 2)])
        feeds = {"image": rng.integers(0, 256, (4, tile, tile, 3), dtype=np.uint8), "mask": mask}
    log(f"export: {payload['path']} ({payload['kind']}, step {payload.get('step')}) -> {model_dir}")
    example = tuple(torch.from_numpy(v[:2]) for v in feeds.values())
    export_onnx(module, example, names, [output_name], onnx_path, max_batch_size)
    check = parity(module, onnx_path, feeds)
    log(f"export: parity torch vs ONNX Runtime on {check['batch']} tiles of {tile}x{tile}: max abs diff "
        f"{check['max_abs_diff']} grey levels ({100 * check['pixels_differing']:.3f}% of pixels differ)")
    if check["max_abs_diff"] > MAX_PARITY_DIFF:
        raise GanforgeError(f"export: ONNX output differs from torch by {check['max_abs_diff']} grey levels "
                            f"(allowed {MAX_PARITY_DIFF}); the model was written to {onnx_path}")
    repo.write_config(model_dir, repo.onnx_model_config(
        name, inputs, [output], max_batch_size, instances=instances, intra_op_threads=intra_op_threads,
        allowed_values=None if kind == "denoise" else {"mask": MASK_VALUES}))
    repo.write_manifest(model_dir, {**source, "model": name, "version": version, "format": "onnx",
                                    "task": kind, "tile": tile, "parity": check})
    log(f"export: wrote {name} ({kind}: {', '.join(names)} -> {output_name}, tile {tile}) into {repository}")
    return {"model": name, "repository": str(repository), "onnx": str(onnx_path),
            "onnx_bytes": onnx_path.stat().st_size, "parity": check, "tile": tile}
