"""Reduced-precision versions of exported models: INT8 (ONNX Runtime static quantization),
FP16 and BF16, each checked against the FP32 graph it came from. The exact graph rewrites that
come first live in rewrites.py.

Only the float part of a graph changes: the learned layers (Conv, ConvTranspose, Gemm, MatMul
whose weight is a trained parameter) and the activations that follow them. The uint8 NHWC
conversions at both ends, the seeded latent sampler of a generator and the classical fills of
the inpainter (their fixed stencils and iterative Loops) stay FP32, so every model keeps its
contract: the same input and output names, dtypes and shapes.

    INT8   QDQ format, per-channel int8 weights, uint8 activations whose ranges come from
           `calibration` samples of the model's own input distribution (training crops with
           the training noise for the denoiser, training crops with training masks for the
           inpainter, seeds and indices / latents for generators). ONNX Runtime's CPU provider
           has int8 kernels for Conv and Gemm, not for ConvTranspose, so each ConvTranspose is
           first rewritten with the same sums (convtranspose_as_conv): of a 1x1 input as a
           Gemm, otherwise as a Conv giving each output phase its own taps, a DepthToSpace
           and a crop. The activation after it moves ahead of the DepthToSpace (so it fuses
           into the int8 conv and the moves run on uint8), and the DepthToSpace is written
           channels-last, where ONNX Runtime's int8 convs run (sink_depth_to_space,
           depth_to_space_channels_last). A weight scaled inside the graph (ProGAN's equalized
           learning rate) is folded first (fold_weight_scales).
    FP16   the learned region in float16, with one Cast in and one Cast out per region.
    BF16   the same in bfloat16, at opset 22 (the first where ONNX's Conv takes bfloat16;
           ConvTranspose rewritten as above, it never does). ONNX Runtime's CPU provider has
           no bfloat16 Conv kernel: export refuses with its message on a CPU-only machine.

Each conversion is measured against the FP32 graph on held-out inputs of the same kind (max and
mean absolute difference in grey levels) and on the model's quality figure (denoiser: PSNR at
sigma 25 on the held-out photos; inpainter: hole PSNR on the inpainting benchmark's crops;
generators: Fréchet distance to held-out shapes with training/metrics.py's classifier).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ganforge.export.rewrites import (LEARNED_OPS, one_opset_entry, producer_of,
                                       convtranspose_as_conv, depth_to_space_channels_last,
                                       float_region, fold_weight_scales, sink_depth_to_space,
                                       to_low_precision)

PRECISIONS = ("fp32", "int8", "fp16", "bf16")
# the quality cost allowed before export warns, in the unit of each task's figure
LIMITS = {"denoise": 0.2, "inpaint": 0.2, "generate": 5.0}
UNITS = {"denoise": "dB", "inpaint": "dB", "generate": "%"}
INT8_ACTIVATIONS = ("Relu", "LeakyRelu")   # those with QDQ support that ORT fuses into the conv
DENOISER_SIGMA = (5.0, 55.0)               # the shipped denoiser's training noise (0-255 scale)


# -- the graph ---------------------------------------------------------------------------------

def task_of(model) -> str:
    """'generate' (seed, index -> image), 'generator' (latent -> image), 'denoise' or 'inpaint',
    from the graph's input names (the served contract, docs/api.md)."""
    names = {i.name for i in model.graph.input}
    if names == {"seed", "index"}:
        return "generate"
    if names == {"latent"}:
        return "generator"
    if names == {"image", "mask"}:
        return "inpaint"
    if names == {"image"}:
        return "denoise"
    raise ValueError(f"a graph with inputs {sorted(names)} has no reduced-precision export")


class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def quantize_int8(src: Path, dst: Path, feeds: list[dict], symmetric: bool = False) -> None:
    """Static INT8 (QDQ, per-channel weights) of the float region of `src`, calibrated on `feeds`.

    `symmetric`: activations as int8 with zero point 0 and biases left in float, the only Q/DQ
    TensorRT builds (its explicit quantization; it quantizes biases itself); ONNX Runtime's CPU
    kernels run the default, uint8 activations with a zero point, which fits post-ReLU ranges
    better, and int32 biases."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = sink_depth_to_space(convtranspose_as_conv(fold_weight_scales(one_opset_entry(onnx.load(src)))))
    region = float_region(model)
    producers = producer_of(model.graph)
    # the moves of a float tensor the region wrote are quantized with it (uint8 in and out)
    moved = {n.name for n in model.graph.node if n.op_type == "DepthToSpace"
             and getattr(producers.get(n.input[0]), "name", None) in region}
    crops = {n.name for n in model.graph.node if n.op_type == "Slice"
             and getattr(producers.get(n.input[0]), "name", None) in moved}
    model = depth_to_space_channels_last(model)
    moves = [f"{base}{step}" for base in moved for step in ("_to_nhwc", "_split", "_move", "_merge", "_to_nchw")]
    moves += sorted(crops) + [n.name for n in model.graph.node if n.op_type == "Reshape"
                              and n.name.endswith("_unflatten")
                              and getattr(producers.get(n.input[0]), "name", None) in region]
    nodes = [n.name for n in model.graph.node
             if n.name in region and (n.op_type in LEARNED_OPS or n.op_type in INT8_ACTIVATIONS)] + moves
    import logging

    reader = type("Reader", (_Feeds, CalibrationDataReader), {})(feeds)
    root = logging.getLogger()
    level = root.level
    # the quantizer advises pre-processing (BatchNormalization folding) on the root logger; the
    # exporter has already folded it, so the advice is noise beside export's own lines
    root.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = Path(tmp) / "float.onnx"
        onnx.save(model, rewritten)
        try:
            quantize_static(str(rewritten), str(dst), reader, quant_format=QuantFormat.QDQ,
                            per_channel=True,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            op_types_to_quantize=[*LEARNED_OPS, *INT8_ACTIVATIONS, "Transpose", "Reshape",
                                                  "Slice"],
                            extra_options={"EnableSubgraph": False, "ActivationSymmetric": symmetric,
                                           "WeightSymmetric": True, "QuantizeBias": not symmetric})
        finally:
            root.setLevel(level)


def convert(src: Path, dst: Path, precision: str, feeds: list[dict] | None = None) -> None:
    """Write `src` (an FP32 ONNX graph) at `precision` to `dst`."""
    import onnx

    from ganforge.errors import GanforgeError

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if precision in ("fp16", "bf16") and not float_region(convtranspose_as_conv(one_opset_entry(onnx.load(src)))):
        raise GanforgeError(f"export: --precision {precision}: {src} has no learned layer whose weight is a "
                            f"stored parameter (a weight scaled inside the graph, as ProGAN's equalized "
                            f"learning rate does, is not recognised); nothing to convert")
    if precision == "fp32":
        if Path(src).resolve() != Path(dst).resolve():
            shutil.copyfile(src, dst)
    elif precision == "int8":
        quantize_int8(Path(src), Path(dst), feeds or [])
    elif precision == "fp16":
        onnx.save(to_low_precision(onnx.load(src), "fp16"), dst)
    else:   # ONNX takes bfloat16 in Conv from opset 22 on, and in ConvTranspose not at all
        from onnx import version_converter

        model = convtranspose_as_conv(one_opset_entry(onnx.load(src)))
        if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 22:
            model = version_converter.convert_version(model, 22)
        onnx.save(to_low_precision(model, "bf16"), dst)


# -- the model's own inputs ------------------------------------------------------------------------

def _shape(model, name: str) -> list[int]:
    t = next(i for i in model.graph.input if i.name == name)
    return [d.dim_value for d in t.type.tensor_type.shape.dim[1:]]


def sample_inputs(model, n: int, seed: int, batch: int = 16) -> tuple[list[dict], str]:
    """`n` samples of the model's own input distribution, in feeds of at most `batch`, and a
    description for the manifest. The same functions training uses draw them."""
    task = task_of(model)
    rng = np.random.default_rng(seed)
    if task in ("generate", "generator"):
        seeds = rng.integers(0, 2 ** 31, n).astype(np.int64).reshape(n, 1)
        index = rng.integers(0, 64, n).astype(np.int64).reshape(n, 1)
        if task == "generate":
            feeds = [{"seed": seeds[i:i + batch], "index": index[i:i + batch]} for i in range(0, n, batch)]
            return feeds, "random (seed, index) pairs: latents drawn by the graph's own sampler"
        from ganforge.serving import sampler

        # the latents of the same pairs: NAME_generator calibrates as NAME's generator part does,
        # so the two INT8 graphs give the same images for the same latents
        z = sampler.latents(seeds.ravel(), index.ravel(), _shape(model, "latent")[0])
        return [{"latent": z[i:i + batch]} for i in range(0, n, batch)], \
            "latents of random (seed, index) pairs (serving.sampler.latents)"
    from ganforge.training import datasets

    tile = _shape(model, "image")[0]
    crops = datasets.random_crops(datasets.skimage_photos(datasets.TRAIN_PHOTOS), n, tile, seed=seed)
    if task == "denoise":
        lo, hi = DENOISER_SIGMA
        sigma = rng.uniform(lo, hi, (n, 1, 1, 1))
        x = np.clip(np.round(crops + rng.standard_normal(crops.shape) * sigma), 0, 255).astype(np.uint8)
        return [{"image": x[i:i + batch]} for i in range(0, n, batch)], \
            (f"{tile}x{tile} training crops (datasets.random_crops of TRAIN_PHOTOS) with Gaussian "
             f"noise of sigma uniform in [{lo:g}, {hi:g}]")
    from ganforge import masks as maskgen

    masks = np.stack([maskgen.mixed(tile, tile, int(s)) for s in rng.integers(0, 2 ** 31, n)])[..., None]
    return [{"image": crops[i:i + batch], "mask": masks[i:i + batch]} for i in range(0, n, batch)], \
        (f"{tile}x{tile} training crops (datasets.random_crops of TRAIN_PHOTOS) with the training "
         f"masks (masks.mixed: centre, blocks, strokes)")


def session(path: Path | str, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def output_diff(ref, test, feeds: list[dict]) -> dict:
    """Max and mean absolute difference in grey levels between two sessions on `feeds`."""
    diffs = [np.abs(ref.run(None, f)[0].astype(np.int16) - test.run(None, f)[0].astype(np.int16)) for f in feeds]
    d = np.concatenate([x.ravel() for x in diffs])
    return {"inputs": int(sum(len(next(iter(f.values()))) for f in feeds)), "max_abs_diff": int(d.max()),
            "mean_abs_diff": round(float(d.mean()), 4), "pixels_differing": round(float((d > 0).mean()), 4)}


# -- the quality figure ------------------------------------------------------------------------------

def denoise_psnr(sess, quick: bool = False) -> float:
    """PSNR (dB) at sigma 25 on the held-out photos, exactly as `ganforge bench denoise` measures
    it (its noise seeds and tiling; `quick`: its 160x160 crops)."""
    from ganforge.benchmarks._quality import held_out_images, psnr
    from ganforge.benchmarks.denoise import noisy
    from ganforge.serving.tiles import run_tiled

    photos, _ = held_out_images(None, quick)
    if quick:
        photos = [ph[:160, :160] for ph in photos]
    tile = sess.get_inputs()[0].shape[1]
    out = []
    for i, ref in enumerate(photos):
        x8 = np.clip(np.round(noisy(ref, 25, seed=1000 * 25 + i)), 0, 255).astype(np.uint8)
        y = run_tiled(x8, tile, lambda b: sess.run(None, {"image": b})[0], 16,
                      overlap=min(32, tile // 2), margin=min(10, tile // 4 - 1))
        out.append(psnr(ref, y))
    return float(np.mean(out))


def inpaint_psnr(sess, quick: bool = False) -> dict:
    """Hole PSNR (dB) per setting on the inpainting benchmark's crops and masks (`ganforge bench
    inpaint`: 48 held-out crops, `quick` 12), and their mean."""
    from ganforge.benchmarks.inpaint import SETTINGS, hole_psnr, make_masks, test_set
    from ganforge.serving.inpaint import inpaint_image

    tile = int(sess.get_inputs()[0].shape[1])
    n = 12 if quick else 48
    images = test_set(None, n, tile)
    out_name = sess.get_outputs()[0].name
    run = lambda t, m: sess.run([out_name], {"image": t, "mask": m})[0]
    res = {}
    for setting in SETTINGS:
        ms = make_masks(setting, n, tile)
        res[setting] = float(np.mean([hole_psnr(inpaint_image(img, m, tile, run, max_batch=16), img, m > 0)
                                      for img, m in zip(images, ms)]))
    res["mean"] = float(np.mean([res[s] for s in SETTINGS]))
    return res


def generated(sess, task: str, n: int) -> np.ndarray:
    """`n` images of a generator graph: seeds 0.. / the sampler's latents of seed 0."""
    out = []
    for i in range(0, n, 64):
        b = min(64, n - i)
        if task == "generate":
            feed = {"seed": np.zeros((b, 1), np.int64), "index": np.arange(i, i + b, dtype=np.int64).reshape(b, 1)}
        else:
            from ganforge.serving import sampler

            z_dim = sess.get_inputs()[0].shape[1]
            feed = {"latent": sampler.sample_latents(0, n, z_dim)[i:i + b]}
        out.append(sess.run(None, feed)[0])
    return np.concatenate(out)


def quality(task: str, ref, test, label: str, quick: bool = False, fd_samples: int = 1000) -> dict:
    """The task's quality figure for the FP32 session `ref` and the converted `test`, the loss
    (dB lost, or FD increase in %) and whether it is within LIMITS."""
    if task == "denoise":
        a, b = denoise_psnr(ref, quick), denoise_psnr(test, quick)
        fig = {"metric": "PSNR at sigma 25 on the held-out photos (dB)", "fp32": round(a, 3),
               label: round(b, 3), "loss": round(a - b, 3)}
    elif task == "inpaint":
        a, b = inpaint_psnr(ref, quick), inpaint_psnr(test, quick)
        fig = {"metric": "hole PSNR, mean of centre25 and freeform (dB)", "fp32": round(a["mean"], 3),
               label: round(b["mean"], 3), "loss": round(a["mean"] - b["mean"], 3),
               "by_setting": {s: {"fp32": round(a[s], 3), label: round(b[s], 3)} for s in a if s != "mean"}}
    else:
        from ganforge.training import datasets, metrics

        x = generated(ref, task, fd_samples)
        classifier, _ = metrics.load_classifier(s=metrics.settings_for(x.shape[1]))
        real = metrics.features(classifier, datasets.shapes(fd_samples, x.shape[1], seed=10_000).images)
        a = metrics.frechet_distance(metrics.features(classifier, x), real)
        b = metrics.frechet_distance(metrics.features(classifier, generated(test, task, fd_samples)), real)
        fig = {"metric": f"FD to {fd_samples} held-out shapes ({fd_samples} samples)", "fp32": round(a, 3),
               label: round(b, 3), "loss": round(100 * (b - a) / a, 2)}
    key = "generate" if task in ("generate", "generator") else task
    fig.update(limit=LIMITS[key], unit=UNITS[key], within_limit=bool(fig["loss"] <= LIMITS[key]))
    return fig


# -- model directories -------------------------------------------------------------------------------

def read_manifest(model_dir: Path) -> dict:
    from ganforge.serving.repository import MANIFEST

    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def version_records(info: dict) -> dict:
    """The manifest's per-version records; a manifest written before versions were recorded
    describes its one FP32 version."""
    records = dict(info.get("versions") or {})
    if not records and info.get("version"):
        records[str(info["version"])] = {"precision": "fp32"}
    return records


def fp32_version(model_dir: Path) -> int:
    """The newest version of a model directory that holds an FP32 graph."""
    records = version_records(read_manifest(model_dir))
    found = [int(v.name) for v in Path(model_dir).iterdir()
             if v.is_dir() and v.name.isdigit() and (v / "model.onnx").is_file()
             and records.get(v.name, {"precision": "fp32"}).get("precision", "fp32") == "fp32"]
    if not found:
        from ganforge.errors import UsageError

        raise UsageError(f"export: {model_dir} holds no FP32 model version (a version directory "
                         f"with model.onnx whose manifest records precision fp32)")
    return max(found)


def _set_version_policy(model_dir: Path) -> None:
    """With more than one version on disk, serve them all (a request without a version gets
    the newest, Triton's rule); with one, Triton's default."""
    from ganforge.serving import repository as repo

    cfg = repo.read_config(model_dir / "config.pbtxt")
    versions = [v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()]
    if len(versions) > 1:
        cfg.version_policy.all.SetInParent()
    else:
        cfg.ClearField("version_policy")
    repo.write_config(model_dir, cfg)


def record_version(model_dir: Path, version: int, record: dict, base: dict | None = None,
                   keep: dict | None = None) -> None:
    """Rewrite the model directory's manifest with `record` for `version` (and the sha256 of
    every file, all versions). `base`: the manifest's other fields (default: its own);
    `keep`: version records to carry over (default: its own)."""
    from ganforge.serving import repository as repo

    info = dict(base if base is not None else read_manifest(model_dir))
    info.pop("files", None)
    records = version_records(info) if keep is None else dict(keep)
    records = {v: r for v, r in records.items() if (model_dir / v).is_dir()}
    records[str(version)] = record
    info["versions"] = dict(sorted(records.items(), key=lambda kv: int(kv[0])))
    # Triton answers a request that names no version with the highest one it serves
    info["default_version"] = max(int(v) for v in info["versions"])
    repo.write_manifest(model_dir, info)


def write_precision(fp32_onnx: Path, target_dir: Path, version: int, precision: str,
                    calibration: int = 256, calibration_seed: int = 0, max_loss: float | None = None,
                    with_quality: bool = True, quick: bool = False, source: str = "",
                    log=print, warn=None) -> dict:
    """Convert the FP32 graph `fp32_onnx` to `precision` and write it as `version` of
    `target_dir` (config.pbtxt already there), measured against the FP32 graph.

    Args:
        fp32_onnx: the FP32 ONNX graph (read before anything is written).
        target_dir: the model directory to write into.
        version: the version directory to write (replaced if present).
        precision: one of PRECISIONS other than "fp32".
        calibration: INT8: how many samples of the model's inputs calibrate its activations.
        calibration_seed: the seed those samples are drawn from (held-out checks use seed + 1).
        max_loss: the quality cost allowed before a warning (default LIMITS of the task).
        with_quality: compute the task's quality figure (False: parity figures only).
        quick: the smaller quality sets (the benchmarks' --quick).
        source: where the FP32 graph came from, for the manifest.
        log, warn: where progress lines and `Warning:` lines go.

    Returns:
        The version's manifest record (precision, calibration, parity, quality).

    Raises:
        GanforgeError: ONNX Runtime cannot load the converted graph on this machine.
    """
    import onnx

    from ganforge.errors import GanforgeError

    warn = warn or log
    model = onnx.load(fp32_onnx)
    task = task_of(model)
    feeds, described = sample_inputs(model, calibration, calibration_seed) if precision == "int8" else ([], "")
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / "fp32.onnx"
        shutil.copyfile(fp32_onnx, ref_path)
        out = Path(tmp) / f"{precision}.onnx"
        convert(ref_path, out, precision, feeds)
        ref = session(ref_path)
        try:
            test = session(out)
        except Exception as exc:  # ONNX Runtime's own reason, e.g. no kernel for a type
            raise GanforgeError(f"export: --precision {precision}: ONNX Runtime's CPU provider cannot "
                                f"load the converted graph: {str(exc).splitlines()[0][:300]}") from None
        held_out, _ = sample_inputs(model, 32, calibration_seed + 1)
        diff = output_diff(ref, test, held_out)
        log(f"export: {precision} vs fp32 on {diff['inputs']} held-out inputs: max abs diff "
            f"{diff['max_abs_diff']} grey levels, mean {diff['mean_abs_diff']:.3f}")
        fig = None
        if with_quality:
            fig = quality(task, ref, test, precision, quick=quick)
            if max_loss is not None:
                fig.update(limit=max_loss, within_limit=bool(fig["loss"] <= max_loss))
            u = fig["unit"]
            log(f"export: {fig['metric']}: fp32 {fig['fp32']}, {precision} {fig[precision]} "
                f"(cost {fig['loss']:+.3f} {u}{' FD' if u == '%' else ''}, limit {fig['limit']} {u})")
            if not fig["within_limit"]:
                warn(f"Warning: {target_dir.name} version {version} ({precision}) costs {fig['loss']:.3f} {u} "
                     f"of {'FD' if u == '%' else 'PSNR'}, {fig['loss'] - fig['limit']:.3f} {u} over the limit "
                     f"of {fig['limit']} {u}")
        dest = target_dir / str(version) / "model.onnx"
        if dest.parent.exists():
            shutil.rmtree(dest.parent)
        dest.parent.mkdir(parents=True)
        shutil.copyfile(out, dest)
    record = {"precision": precision, "source": source, "parity_fp32": diff,
              **({"quality": fig} if fig else {})}
    if Path(sys.argv[0]).name == "ganforge":
        record["export_command"] = " ".join(["ganforge", *sys.argv[1:]])
    if precision == "int8":
        record["calibration"] = {"data": described, "n": calibration, "seed": calibration_seed,
                                 "method": "MinMax", "format": "QDQ, per-channel int8 weights, uint8 activations"}
    return record


def export_from_directory(model_dir: str | Path, repository: str | Path | None, name: str | None,
                          version: int | None, precision: str, calibration: int = 256,
                          calibration_seed: int = 0, max_loss: float | None = None,
                          quick: bool = False, log=print, warn=None) -> dict:
    """`ganforge export MODEL_DIR --precision P`: a reduced-precision version of a model
    directory's FP32 graph, for a repository that has no checkpoints (the shipped one).

    Writes `repository/name/version` (default: the same directory, the next free version); a
    new target directory gets the source's config.pbtxt under its own name."""
    from ganforge.errors import UsageError

    src_dir = Path(model_dir)
    if precision == "fp32":
        raise UsageError(f"--precision: fp32 from a model directory ({src_dir}) would copy it; "
                         f"choose int8, fp16 or bf16")
    src_version = fp32_version(src_dir)
    if read_manifest(src_dir).get("any_size"):   # calibration and the quality figures take one tile
        raise UsageError(f"--precision: {precision} is not allowed for {src_dir}, exported with --any-size; "
                         f"export the run again with --tile N for a reduced-precision version")
    target = Path(repository) / (name or src_dir.name) if repository else src_dir / ".." / (name or src_dir.name)
    target = target.resolve()
    if version is None:
        taken = [int(v.name) for v in target.iterdir() if v.is_dir() and v.name.isdigit()] if target.is_dir() else []
        version = max(taken, default=0) + 1
    if version < 1:
        raise UsageError(f"--version: {version} is not allowed; must be >= 1")
    same = target == src_dir.resolve()
    if same and version == src_version:
        raise UsageError(f"--version: {version} is the FP32 version this export reads; choose another")
    name = target.name
    log(f"export: {src_dir}/{src_version}/model.onnx (fp32) -> {precision} as {target}/{version}")
    base = read_manifest(src_dir)
    keep = version_records(base) if same else (version_records(read_manifest(target)) if target.is_dir() else {})
    created = not target.exists()
    try:
        return _write_from_directory(src_dir, src_version, target, version, precision, calibration,
                                     calibration_seed, max_loss, quick, same, base, keep, log, warn)
    except BaseException:
        if created and target.exists():   # a half-made directory would stop the server's start
            shutil.rmtree(target)
        raise


def _write_from_directory(src_dir, src_version, target, version, precision, calibration,
                          calibration_seed, max_loss, quick, same, base, keep, log, warn) -> dict:
    from ganforge.serving import repository as repo

    name = target.name
    if not same:
        target.mkdir(parents=True, exist_ok=True)
        cfg = repo.read_config(src_dir / "config.pbtxt")
        cfg.name = name
        repo.write_config(target, cfg)
        base = {**base, "model": name, "derived_from": str(src_dir.resolve())}
        base.pop("versions", None)
    record = write_precision(src_dir / str(src_version) / "model.onnx", target, version, precision,
                             calibration, calibration_seed, max_loss, quick=quick,
                             source=f"{src_dir.resolve()}/{src_version}/model.onnx "
                                    f"(sha256 {repo.sha256(src_dir / str(src_version) / 'model.onnx')})",
                             log=log, warn=warn)
    _set_version_policy(target)
    record_version(target, version, record, base=base, keep=keep)
    log(f"export: wrote {name} version {version} ({precision}) into {target.parent}")
    return {"model": name, "repository": str(target.parent), "version": version, **record,
            "parity": record["parity_fp32"]}
