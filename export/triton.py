"""`ganforge export`: a training run -> ONNX generator + Triton model directories + manifests.

For a generator NAME it writes NAME_generator (ONNX, latent -> image), NAME_sampler (ONNX,
(seed, index) -> latent) and NAME (the two in one graph: seed, index -> image, the model clients
call), see serving/repository.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import ganforge
from ganforge.errors import UsageError
from ganforge.export.onnx import UInt8Images, export_onnx, parity
from ganforge.serving import repository as repo
from ganforge.serving import sampler
from ganforge.training.gan import build_dcgan, load_checkpoint
from ganforge.training.options import train_command
from ganforge.serving.repository import sha256, tensor

MAX_PARITY_DIFF = 1  # grey levels; the exported graph rounds exactly as torch does


def source_commit() -> str | None:
    """The git commit of the ganforge tree doing the export (None outside a git checkout);
    a '+dirty' suffix marks uncommitted changes to the source (the exported models in
    model_repository/ are outputs, not source: re-exporting several leaves it clean)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)model_repository"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def default_name(payload: dict) -> str:
    data = Path(str(payload.get("data", "model"))).name or "model"
    return re.sub(r"[^a-z0-9_]+", "_", f"{payload['kind']}_{data}".lower()).strip("_")


def _dcgan_generator(payload: dict) -> torch.nn.Module:
    return build_dcgan(payload)[0]


def _progan_generator(payload: dict) -> torch.nn.Module:
    from ganforge.training.progan_nets import Upsampled, build_progan

    return Upsampled(build_progan(payload)[0]).eval()  # its recorded stage, at full resolution


# checkpoint kind -> G (eval mode, z (B, z_dim) -> image (B, C, R, R) in [-1, 1]) from a payload
GENERATORS = {"dcgan": _dcgan_generator, "progan": _progan_generator}


def build_generator(payload: dict) -> tuple[torch.nn.Module, object]:
    """The generator of any generator checkpoint kind, and its config dataclass (which has
    z_dim, resolution and channels)."""
    from ganforge.training.gan import config_from_checkpoint

    return GENERATORS[payload["kind"]](payload), config_from_checkpoint(payload)


def _quiet_exporter():
    """torch.onnx's dynamo exporter logs every skipped optional op; keep export output short."""
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def init_commands(payload: dict, limit: int = 10) -> list[str]:
    """The train commands of the runs a fine-tuned run started from (`--init`), oldest first:
    with the run's own `train_command` they rebuild the weights from scratch."""
    from ganforge.errors import CheckpointError

    out: list[str] = []
    init = (payload.get("train") or {}).get("init")
    while init and len(out) < limit:
        try:
            parent = load_checkpoint(init)
        except CheckpointError:
            out.insert(0, f"(started from {init}, which this export could not read)")
            break
        out.insert(0, train_command(parent["kind"], parent["train"], Path(parent["path"]).parent))
        init = parent["train"].get("init")
    return out


def source_info(payload: dict) -> dict:
    """Where an exported model came from, for its manifest."""
    before = init_commands(payload)
    return {
        "source_checkpoint": str(Path(payload["path"]).resolve()),
        "source_checkpoint_sha256": sha256(Path(payload["path"])),
        "kind": payload["kind"],
        "step": payload.get("step"),
        "data": payload.get("data"),
        "seed": payload.get("seed"),
        **({"validation": payload["validation"]} if payload.get("validation") else {}),
        "config": payload["config"],
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "ganforge_version": ganforge.__version__,
        "torch_version": torch.__version__,
        "train_command": payload.get("command") or (
            train_command(payload["kind"], payload["train"], Path(payload["path"]).parent)
            if "train" in payload else None),
        **({"init_commands": before} if before else {}),
        "export_command": " ".join(["ganforge", *sys.argv[1:]]) if Path(sys.argv[0]).name == "ganforge" else None,
        "source_commit": source_commit(),
    }


# Model instances per device by default. A generator's image is cheap, so a request's fixed
# cost in the server (the hand-off to the backend and back) is a large share of a batch's time;
# with two instances one runs while the other hands off, each with half the CPUs (measured in
# docs/performance.md, "Two instances for the generators"). The image models' batches are long,
# so the hand-off is a small share, and each instance would hold its own activations: one.
GENERATOR_INSTANCES = 2
IMAGE_MODEL_INSTANCES = 1


def export_run(run: str | Path, repository: str | Path, name: str | None = None,
               max_batch_size: int | None = None, version: int = 1, instances: int | None = None,
               intra_op_threads: int = 0, tile: int = 128, ort_trt: str | None = None,
               precision: str = "fp32", calibration: int = 256, calibration_seed: int = 0,
               max_loss: float | None = None, any_size: bool = False, log=print, warn=None) -> dict:
    """Export whatever a run holds, by its checkpoint's kind: a generator (seeded graph + sampler + generator) or
    an image-to-image model (denoiser, inpainter); at `precision` (export/quantize.py: the FP32
    graph is exported and checked against torch first, then converted and checked against it).
    `any_size`: an image model takes any height and width on its stride (export/image.py)."""
    from ganforge.export import quantize

    _quiet_exporter()
    if instances is not None and instances < 1:
        raise UsageError(f"--instances: {instances} is not allowed; must be >= 1")
    if precision not in quantize.PRECISIONS:
        raise UsageError(f"--precision: {precision!r} is not allowed; choose {', '.join(quantize.PRECISIONS)}")
    if calibration < 1:
        raise UsageError(f"--calibration: {calibration} is not allowed; must be >= 1")
    if precision != "fp32" and ort_trt:
        raise UsageError(f"--precision: {precision} is not allowed with --ort-trt (TensorRT picks its "
                         f"own precision); leave --precision fp32")
    if any_size and precision != "fp32":
        raise UsageError(f"--precision: {precision} is not allowed with --any-size (calibration takes "
                         f"one tile size); leave --precision fp32")
    payload = load_checkpoint(run)
    kind = payload.get("kind")
    if any_size:
        from ganforge.export.image import check_any_size

        check_any_size(payload)
    name = name or default_name(payload)
    repository = Path(repository)
    dirs = ([name, f"{name}_generator", f"{name}_sampler"] if kind in GENERATORS else [name])
    before = {d: quantize.version_records(quantize.read_manifest(repository / d)) for d in dirs}
    summary = _export_fp32(run, repository, name, max_batch_size, version, instances, intra_op_threads,
                           tile, ort_trt, payload, kind, log, any_size)
    converted = [name, f"{name}_generator"] if kind in GENERATORS else [name]
    for d in dirs:
        model_dir = repository / d
        record = {"precision": "fp32"}
        if precision != "fp32" and d in converted:
            record = quantize.write_precision(
                model_dir / str(version) / "model.onnx", model_dir, version, precision, calibration,
                calibration_seed, max_loss, with_quality=(d == name), source="the FP32 export of the "
                "same checkpoint (its torch parity in the manifest's `parity`)", log=log, warn=warn)
            if d == name:
                summary.update(precision=precision, precision_record=record)
        quantize._set_version_policy(model_dir)
        quantize.record_version(model_dir, version, record, keep=before[d])
    return summary


def _export_fp32(run, repository, name, max_batch_size, version, instances, intra_op_threads, tile,
                 ort_trt, payload, kind, log, any_size=False) -> dict:
    if kind in GENERATORS:
        return export_generator(run, repository, name=name, max_batch_size=max_batch_size or 64,
                                version=version,
                                instances=GENERATOR_INSTANCES if instances is None else instances,
                                intra_op_threads=intra_op_threads, ort_trt=ort_trt, log=log)
    if ort_trt:
        raise UsageError(f"--ort-trt: {kind!r} models have no TensorRT-provider export yet; "
                         f"allowed for generators (dcgan, progan)")
    if kind == "pix2pix" and payload["config"].get("task") != "inpaint":
        raise UsageError(f"export: {payload['path']} holds a pix2pix model for task "
                         f"{payload['config'].get('task')!r}; only task 'inpaint' has a served contract")
    if kind in ("denoiser", "inpainter", "pix2pix", "context-encoder"):
        from ganforge.export.image import any_size_shape, export_image_model
        from ganforge.training.gan import CONFIGS

        if kind == "denoiser":
            from ganforge.training.autoencoders import Denoiser as Net
        elif kind == "pix2pix":
            from ganforge.training.pix2pix import UNet as Net
        elif kind == "context-encoder":
            from ganforge.training.context_encoder import UNet as Net
        else:
            from ganforge.training.inpainting import ContextEncoder as Net
        if version < 1:
            raise UsageError(f"--version: {version} is not allowed; must be >= 1")
        net = Net(CONFIGS[kind](**payload["config"]))
        net.load_state_dict(payload["state"]["net"])
        stride = None
        if any_size:   # the least side served is the training tile, not --tile
            stride, tile = any_size_shape(payload, net)
        return export_image_model(payload, net.eval(), "denoise" if kind == "denoiser" else "inpaint",
                                  repository, name or default_name(payload), tile,
                                  max_batch_size or 16, version,
                                  IMAGE_MODEL_INSTANCES if instances is None else instances,
                                  intra_op_threads,
                                  source_info(payload), log=log, stride=stride)
    raise UsageError(f"export: {payload['path']} holds a {kind!r} model, which has no export")


def _clear(model_dir: Path, version: int) -> None:
    """Make way for `version` of an ONNX model directory: its other versions stay (a
    reduced-precision version beside the FP32 one); a directory that held another kind of
    model (a Python sampler, an ensemble) goes entirely."""
    if not model_dir.exists():
        return
    cfg = model_dir / "config.pbtxt"
    if cfg.is_file() and repo.read_config(cfg).platform == "onnxruntime_onnx":
        if (model_dir / str(version)).exists():
            shutil.rmtree(model_dir / str(version))
    else:
        shutil.rmtree(model_dir)


def export_generator(run: str | Path, repository: str | Path, name: str | None = None,
                     max_batch_size: int = 64, version: int = 1, instances: int = GENERATOR_INSTANCES,
                     intra_op_threads: int = 0, ort_trt: str | None = None, log=print) -> dict:
    """Export the generator of a training run into a Triton model repository.

    Args:
        run: a run directory (holding checkpoint.pt) or a checkpoint file.
        repository: the model repository to write into (created if missing).
        name: the model name clients use; default `<kind>_<data>`, e.g. `dcgan_shapes`.
        max_batch_size: the largest batch Triton forms, and the largest `count` per request.
        version: the model version directory to write (replaced if present).
        instances: model instances per device in config.pbtxt (for the seeded graph and the
            generator; the sampler keeps one).
        intra_op_threads: ONNX Runtime threads per instance (0: the backend's default, an
            equal share of the CPUs per instance).
        ort_trt: "fp32" or "fp16" to have Triton's onnxruntime backend run the generator
            through ONNX Runtime's TensorRT execution provider on GPUs (engine cache on);
            None for plain ONNX Runtime.
        log: where progress lines go.

    Returns:
        A summary: model names, paths, parity figures.

    Raises:
        CheckpointError: `run` holds no ganforge checkpoint of a generator.
        UsageError: a bad name, batch size or version.
    """
    _quiet_exporter()
    payload = load_checkpoint(run, kinds=tuple(GENERATORS))
    name = name or default_name(payload)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]{0,63}", name):
        raise UsageError(f"--name: {name!r} is not allowed; use 1-64 letters, digits, '_' or '-', "
                         f"starting with a letter")
    if not 1 <= max_batch_size <= 1024:
        raise UsageError(f"--max-batch-size: {max_batch_size} is not allowed; must be in [1, 1024]")
    if version < 1:
        raise UsageError(f"--version: {version} is not allowed; must be >= 1")
    if instances < 1:
        raise UsageError(f"--instances: {instances} is not allowed; must be >= 1")
    G, cfg = build_generator(payload)
    module = UInt8Images(G).eval()
    repository = Path(repository)
    gen_name, sampler_name = f"{name}_generator", f"{name}_sampler"
    gen_dir, sampler_dir, seeded_dir = repository / gen_name, repository / sampler_name, repository / name
    latent = tensor("latent", "FP32", [cfg.z_dim])
    image = tensor("image", "UINT8", [cfg.resolution, cfg.resolution, cfg.channels])

    log(f"export: {payload['path']} ({payload['kind']}, step {payload.get('step')}) -> {gen_dir}")
    onnx_path = gen_dir / str(version) / "model.onnx"
    if onnx_path.parent.exists():
        shutil.rmtree(onnx_path.parent)
    example = (torch.randn(2, cfg.z_dim),)
    export_onnx(module, example, ["latent"], ["image"], onnx_path, max_batch_size)
    z = sampler.sample_latents(0, max_batch_size, cfg.z_dim)
    check = parity(module, onnx_path, {"latent": z})
    log(f"export: parity torch vs ONNX Runtime on {check['batch']} latents: max abs diff "
        f"{check['max_abs_diff']} grey levels ({100 * check['pixels_differing']:.3f}% of pixels differ)")
    if check["max_abs_diff"] > MAX_PARITY_DIFF:
        raise ganforge.errors.GanforgeError(
            f"export: ONNX output differs from torch by {check['max_abs_diff']} grey levels "
            f"(allowed {MAX_PARITY_DIFF}); the model was written to {onnx_path} for inspection")

    source = source_info(payload)
    if "stage" in payload:  # a growing generator: the stage and alpha it was exported at
        source.update(stage=payload["stage"], alpha=payload["alpha"])
    gen_cfg = repo.onnx_model_config(gen_name, [latent], [image], max_batch_size,
                                     instances=instances, intra_op_threads=intra_op_threads)
    if ort_trt:
        repo.add_ort_tensorrt(gen_cfg, precision=ort_trt,
                              engine_cache_path=f"/tmp/ganforge-trt-cache/{gen_name}")
    repo.write_config(gen_dir, gen_cfg)
    repo.write_manifest(gen_dir, {**source, "model": gen_name, "version": version,
                                  "format": "onnx", "parity": check})

    # NAME_sampler: (seed, index) -> latent, the counter-based draw as ONNX ops (TensorRT
    # ensembles put it in front of their plan); NAME: the sampler and the generator merged into
    # one graph, so generation by seed is one batched ONNX Runtime call
    import onnx
    from onnx import compose

    seed_in, index_in = tensor("seed", "INT64", [1]), tensor("index", "INT64", [1])
    graph = sampler.latent_graph(cfg.z_dim)
    sampler_path = sampler_dir / str(version) / "model.onnx"
    _clear(sampler_dir, version)   # an older export's Python sampler must not linger
    sampler_path.parent.mkdir(parents=True)
    onnx.save(graph, sampler_path)
    repo.write_config(sampler_dir, repo.onnx_model_config(
        sampler_name, [seed_in, index_in], [latent], max_batch_size, instances=1, intra_op_threads=1))
    repo.write_manifest(sampler_dir, {"model": sampler_name, "version": version, "format": "onnx",
                                      "generator": gen_name, "z_dim": cfg.z_dim})

    merged = compose.merge_models(graph, onnx.load(onnx_path), io_map=[("latent", "latent")])
    merged.graph.name = name
    seeded_path = seeded_dir / str(version) / "model.onnx"
    _clear(seeded_dir, version)       # a directory an earlier export made (an ensemble goes whole)
    seeded_path.parent.mkdir(parents=True)
    onnx.save(merged, seeded_path)
    count = min(5, max_batch_size)
    seeded = parity(module, seeded_path, {"seed": np.full((count, 1), 3, np.int64),
                                          "index": np.arange(count, dtype=np.int64).reshape(-1, 1)},
                    torch_inputs={"latent": sampler.sample_latents(3, count, cfg.z_dim)})
    if seeded["max_abs_diff"] > MAX_PARITY_DIFF:
        raise ganforge.errors.GanforgeError(
            f"export: {name} (seed -> image) differs from torch on the same latents by "
            f"{seeded['max_abs_diff']} grey levels (allowed {MAX_PARITY_DIFF}); written to {seeded_path}")
    seeded_cfg = repo.onnx_model_config(name, [seed_in, index_in], [image], max_batch_size,
                                        instances=instances, intra_op_threads=intra_op_threads)
    if ort_trt:
        repo.add_ort_tensorrt(seeded_cfg, precision=ort_trt, engine_cache_path=f"/tmp/ganforge-trt-cache/{name}")
    repo.write_config(seeded_dir, seeded_cfg)
    repo.write_manifest(seeded_dir, {**source, "model": name, "version": version, "format": "onnx",
                                     "graphs": [sampler_name, gen_name], "parity": seeded})
    summary = {"model": name, "generator": gen_name, "sampler": sampler_name,
               "repository": str(repository), "onnx": str(onnx_path),
               "onnx_bytes": onnx_path.stat().st_size, "parity": check}
    log(f"export: wrote {name} (seed, index -> image), {gen_name} (latent -> image), "
        f"{sampler_name} (seed, index -> latent) into {repository}")
    return summary
