"""Image-to-image models (denoiser, inpainter) to ONNX + Triton, uint8 NHWC on both sides.

Denoiser:  image UINT8 [batch, T, T, 3]                     -> denoised UINT8 [batch, T, T, 3]
Inpainter: image UINT8 [batch, T, T, 3], mask UINT8 [batch, T, T, 1] (255 = hole)
                                                             -> inpainted UINT8 [batch, T, T, 3]
With `--any-size` T x T is H x W, any multiples of the network's stride (dims -1 in the config).
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


# checkpoint kind -> (the network's stride: sides must be multiples of its total downsampling,
# the training option holding the tile side it learned on), for `ganforge export --any-size`
ANY_SIZE = {
    "context-encoder": (lambda net: 2 ** net.cfg.depth, "tile"),   # a strided stem, depth - 1 stages
    "denoiser": (lambda net: 1, "patch"),                            # stride-1 convolutions only
}


def check_any_size(payload: dict) -> None:
    """UsageError, naming the kinds that take `--any-size`, unless the checkpoint is one of them."""
    kind = payload.get("kind")
    if kind not in ANY_SIZE:
        raise UsageError(f"--any-size: {payload['path']} holds a {kind!r} model, which is not exported at "
                         f"any size; allowed for {' and '.join(ANY_SIZE)} models (fully convolutional)")


def any_size_shape(payload: dict, net: nn.Module) -> tuple[int, int]:
    """(stride, min_side) of a network `--any-size` exports: its total downsampling, and the tile
    side it was trained on."""
    check_any_size(payload)
    stride_of, option = ANY_SIZE[payload["kind"]]
    return stride_of(net), int(payload["train"][option])


def _feeds(kind: str, n: int, h: int, w: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`n` random images of h x w (and, for the inpainter, masks: centre holes and strokes)."""
    feeds = {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)}
    if kind == "inpaint":
        # centre holes and free-form strokes: iterative fills must agree on both
        mask = np.zeros((n, h, w, 1), np.uint8)
        mask[:n // 2, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        mask[n // 2:, ..., 0] = np.stack([maskgen.strokes(h, w, seed) for seed in range(1, n - n // 2 + 1)])
        feeds["mask"] = mask
    return feeds


def export_image_model(payload: dict, net: nn.Module, kind: str, repository: str | Path, name: str,
                       tile: int, max_batch_size: int, version: int, instances: int,
                       intra_op_threads: int, source: dict, log=print, stride: int | None = None) -> dict:
    """Export a denoiser (`kind` 'denoise') or an inpainter ('inpaint') as one Triton model.

    Args:
        tile: the side of the tiles the model takes; with `stride`, the least side (min_side).
        stride: None for T x T tiles; else the model takes any height and width that are
            multiples of `stride` (`ganforge export --any-size`): dynamic axes in the graph,
            dims -1 in config.pbtxt, `stride` and `min_side` in its parameters, parity checked
            at two sizes.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]{0,63}", name):
        raise UsageError(f"--name: {name!r} is not allowed; use 1-64 letters, digits, '_' or '-', "
                         f"starting with a letter")
    if stride is None and (not 16 <= tile <= 1024 or tile % 8):
        raise UsageError(f"--tile: {tile} is not allowed; must be a multiple of 8 in [16, 1024]")
    if stride is not None and (tile < 1 or tile % stride):
        raise UsageError(f"--any-size: the training tile {tile} of {payload['path']} is not a multiple "
                         f"of the network's stride {stride}; it cannot be the least side served")
    if not 1 <= max_batch_size <= 256:
        raise UsageError(f"--max-batch-size: {max_batch_size} is not allowed; must be in [1, 256]")
    repository = Path(repository)
    model_dir = repository / name
    onnx_path = model_dir / str(version) / "model.onnx"
    if onnx_path.parent.exists():
        shutil.rmtree(onnx_path.parent)
    rng = np.random.default_rng(0)
    side = tile if stride is None else -1
    image = tensor("image", "UINT8", [side, side, 3])
    output_name = "denoised" if kind == "denoise" else "inpainted"
    output = tensor(output_name, "UINT8", [side, side, 3])
    if kind == "denoise":
        module = UInt8Denoise(net.eval()).eval()
        inputs, names = [image], ["image"]
    else:
        module = UInt8Inpaint(net.eval()).eval()
        inputs, names = [image, tensor("mask", "UINT8", [side, side, 1])], ["image", "mask"]
    # fixed size: 4 tiles; any size: the least side and a non-square size, so neither axis is
    # checked only where height and width agree
    sizes = [(tile, tile, 4)] + ([] if stride is None else [(tile + stride, 2 * tile, 2)])
    all_feeds = [_feeds(kind, n, h, w, rng) for h, w, n in sizes]
    log(f"export: {payload['path']} ({payload['kind']}, step {payload.get('step')}) -> {model_dir}")
    # an example of unequal height and width: equal ones would tie the two axes together
    example = tuple(torch.from_numpy(v[:2]) for v in all_feeds[-1].values())
    export_onnx(module, example, names, [output_name], onnx_path, max_batch_size, stride=stride)
    checks = {f"{h}x{w}": parity(module, onnx_path, feeds) for (h, w, _), feeds in zip(sizes, all_feeds)}
    check = max(checks.values(), key=lambda c: (c["max_abs_diff"], c["pixels_differing"]))
    if stride is not None:
        check = {**check, "sizes": checks}
    for size, c in checks.items():
        log(f"export: parity torch vs ONNX Runtime on {c['batch']} tiles of {size}: max abs diff "
            f"{c['max_abs_diff']} grey levels ({100 * c['pixels_differing']:.3f}% of pixels differ)")
    if check["max_abs_diff"] > MAX_PARITY_DIFF:
        raise GanforgeError(f"export: ONNX output differs from torch by {check['max_abs_diff']} grey levels "
                            f"(allowed {MAX_PARITY_DIFF}); the model was written to {onnx_path}")
    params = None if stride is None else {"stride": str(stride), "min_side": str(tile)}
    repo.write_config(model_dir, repo.onnx_model_config(
        name, inputs, [output], max_batch_size, instances=instances, intra_op_threads=intra_op_threads,
        allowed_values=None if kind == "denoise" else {"mask": MASK_VALUES}, parameters=params,
        warmup_side=tile))
    shape = {"tile": tile} if stride is None else {"any_size": True, "stride": stride, "min_side": tile}
    repo.write_manifest(model_dir, {**source, "model": name, "version": version, "format": "onnx",
                                    "task": kind, **shape, "parity": check})
    what = f"tile {tile}" if stride is None else f"any size, multiples of {stride}, at least {tile}"
    log(f"export: wrote {name} ({kind}: {', '.join(names)} -> {output_name}, {what}) into {repository}")
    return {"model": name, "repository": str(repository), "onnx": str(onnx_path),
            "onnx_bytes": onnx_path.stat().st_size, "parity": check, **shape}
