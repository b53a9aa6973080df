"""`ganforge bench inpaint`: learned inpainters vs classical methods, PSNR and SSIM over the hole.

    ganforge bench inpaint --json inpaint.json [--images DIR] [--quick]
        [--model LABEL=PATH ...] [--size 64] [--n 48]

Test images: square crops of the held-out photos (scikit-image's chelsea and coffee, never seen
in training) or of every photo under `--images DIR`, resized to `--size` (default: the models'
tile, so each crop is one model tile). Two settings, one hole per crop:
- `centre25`: a centred square hole covering 25 % of the crop;
- `freeform`: random free-form strokes (ganforge.masks.strokes, 15-30 % of the crop), seeded.
Methods: OpenCV Telea and Navier-Stokes (radius 3), scikit-image `inpaint_biharmonic`, and each
learned model given as `--model LABEL=PATH`, PATH a run directory / checkpoint (torch) or a
Triton model directory holding `1/model.onnx` (ONNX Runtime). Default models: the shipped
`model_repository/fill_thinplate` (the learned blend of classical fills),
`model_repository/inpainter_photos` (the context encoder) and the run `runs/pix2pix_inpaint`
(pix2pix) where present. Every method's output keeps the known
pixels (learned models go through serving/inpaint.py, as the client does).

PSNR over the hole: 10 log10(255² / MSE over the hole's pixels and channels), averaged over
crops. SSIM over the hole: scikit-image's SSIM map (7x7 window, per channel) averaged over the
hole's pixels, then over crops. Texture: the high-frequency energy in the hole (squared
Laplacian of the luminance) over the original's, averaged over crops: 1 as detailed as the
photo, near 0 for a smooth fill. A model that takes any size (a context encoder's run, an
`--any-size` export) inpaints each hole's window at the crop's own resolution; a fixed-tile one
at its tile. Writes the JSON `{method: {setting: {psnr, ssim, texture}}}`, a table
(stdout and `<json>.md`) and `<json>.png`: examples side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ganforge import masks as maskgen
from ganforge.errors import UsageError

SETTINGS = ("centre25", "freeform")


def test_set(images: str | None, n: int, size: int, seed: int = 123) -> np.ndarray:
    from ganforge.training import datasets

    photos = (datasets.folder_photos(images) if images
              else datasets.skimage_photos(datasets.HELD_OUT_PHOTOS))
    return datasets.random_crops(photos, n, size, seed=seed, scale=(0.2, 0.6))


def make_masks(setting: str, n: int, size: int, seed: int = 7000) -> np.ndarray:
    if setting == "centre25":
        return np.stack([maskgen.centre(size, size, 0.25)] * n)
    return np.stack([maskgen.strokes(size, size, seed + i) for i in range(n)])


def hole_psnr(out: np.ndarray, ref: np.ndarray, hole: np.ndarray) -> float:
    d = out.astype(np.float64)[hole] - ref.astype(np.float64)[hole]
    mse = float((d ** 2).mean())
    return 99.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def hole_texture(out: np.ndarray, ref: np.ndarray, hole: np.ndarray) -> float:
    """High-frequency energy inside the hole over the original's there: the squared Laplacian
    of the luminance summed over the hole's pixels. 1 is as detailed as the photo, a smooth
    fill is near 0, speckle above 1. NaN where the original hole is flat."""
    from skimage.filters import laplace

    weights = np.array([0.299, 0.587, 0.114])
    e_out = (laplace(out.astype(np.float64) @ weights)[hole] ** 2).sum()
    e_ref = (laplace(ref.astype(np.float64) @ weights)[hole] ** 2).sum()
    return float(e_out / e_ref) if e_ref > 0 else float("nan")


def hole_ssim(out: np.ndarray, ref: np.ndarray, hole: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    _, smap = structural_similarity(ref, out, channel_axis=2, data_range=255, full=True)
    return float(smap.mean(axis=2)[hole].mean())


# -- methods: (image (H, W, 3) uint8, mask (H, W) uint8 255 = hole) -> image --------------------

def telea(image, mask):
    import cv2

    return cv2.inpaint(image, mask, 3, cv2.INPAINT_TELEA)


def navier_stokes(image, mask):
    import cv2

    return cv2.inpaint(image, mask, 3, cv2.INPAINT_NS)


def biharmonic(image, mask):
    from skimage.restoration import inpaint_biharmonic

    out = inpaint_biharmonic(image, mask > 0, channel_axis=-1)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def learned(path: str) -> tuple[Callable, str]:
    """An inpainting function for a run/checkpoint (torch) or a model directory (ONNX Runtime).

    Runs of every network fed (masked image, mask): the inpainter, the context encoder, its
    masked autoencoder (`mae`, the same U-Net) and an `inpaint` pix2pix."""
    from ganforge.serving.inpaint import AnySize, inpaint_image

    p = Path(path)
    if (p / "1" / "model.onnx").is_file() or p.suffix == ".onnx":
        import onnxruntime as ort

        onnx = p if p.suffix == ".onnx" else p / "1" / "model.onnx"
        sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        side = sess.get_inputs()[0].shape[1]
        tile = int(side) if isinstance(side, int) else _any_size(onnx.parent.parent / "manifest.json", path)
        out_name = sess.get_outputs()[0].name
        kind = "onnx"

        def run(tiles, tmasks):
            return sess.run([out_name], {"image": tiles, "mask": tmasks})[0]
    else:
        import torch

        from ganforge.export.image import UInt8Inpaint
        from ganforge.training.gan import CONFIGS, load_checkpoint

        payload = load_checkpoint(p, kinds=("inpainter", "pix2pix", "context-encoder", "mae"))
        if payload["kind"] == "pix2pix":
            if payload["config"].get("task") != "inpaint":
                raise UsageError(f"--model: {path} holds a pix2pix {payload['config'].get('task')!r} model; "
                                 f"only a pix2pix trained with --task inpaint inpaints")
            from ganforge.training.pix2pix import UNet as Net
        elif payload["kind"] in ("context-encoder", "mae"):      # mae.py trains the context encoder's F
            import ganforge.training.mae  # noqa: F401  (registers the "mae" kind in CONFIGS)
            from ganforge.training.context_encoder import UNet as Net
        else:
            from ganforge.training.inpainting import ContextEncoder as Net
        net = Net(CONFIGS[payload["kind"]](**payload["config"]))
        net.load_state_dict(payload["state"]["net"])
        module = UInt8Inpaint(net.eval()).eval()
        tile = int(payload.get("train", {}).get("tile", 64))
        if payload["kind"] in ("context-encoder", "mae"):   # fully convolutional: the photo's own size
            tile = AnySize(2 ** net.cfg.depth, tile)
        kind = payload["kind"]

        def run(tiles, tmasks):
            with torch.no_grad():
                return module(torch.from_numpy(tiles), torch.from_numpy(tmasks)).numpy()
    how = f"{kind}, {tile}" if isinstance(tile, AnySize) else f"{kind}, tile {tile}"
    return (lambda image, mask: inpaint_image(image, mask, tile, run, max_batch=16)), how


def _any_size(manifest: Path, path: str):
    """The AnySize of a model directory exported with --any-size, from its manifest."""
    from ganforge.serving.inpaint import AnySize

    info = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if not info.get("any_size"):
        raise UsageError(f"--model: {path} takes images of any size but has no manifest.json saying its "
                         f"stride; export it with ganforge export --any-size")
    return AnySize(int(info["stride"]), int(info["min_side"]))


def load_models(specs: list[str], log=print) -> dict[str, Callable]:
    """`--model LABEL=PATH` values -> {label: inpainting function} (`learned`), each named in `log`."""
    methods: dict[str, Callable] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise UsageError(f"--model: {spec!r} is not allowed; expected LABEL=PATH")
        if not Path(path).exists():
            raise UsageError(f"--model: {path} does not exist")
        methods[label], how = learned(path)
        log(f"model {label}: {path} ({how})")
    return methods


def default_models() -> list[str]:
    """The shipped photo inpainters (what `ganforge inpaint` serves) and the pix2pix run where present."""
    found = []
    for name in ("fill_thinplate", "inpainter_photos"):
        if Path(f"model_repository/{name}/1/model.onnx").is_file():
            found.append(f"{name}=model_repository/{name}")
    if Path("runs/pix2pix_inpaint/checkpoint.pt").is_file():
        found.append("pix2pix=runs/pix2pix_inpaint")
    return found


def evaluate(methods: dict[str, Callable], images: np.ndarray, masks: dict[str, np.ndarray],
             log=print) -> tuple[dict, dict]:
    results: dict[str, dict] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for name, fn in methods.items():
        results[name] = {}
        for setting, ms in masks.items():
            psnrs, ssims, textures, outs = [], [], [], []
            t0 = time.perf_counter()
            for img, m in zip(images, ms):
                out = fn(img, m)
                hole = m > 0
                if not np.array_equal(out[~hole], img[~hole]):
                    raise AssertionError(f"{name} changed known pixels")
                psnrs.append(hole_psnr(out, img, hole))
                ssims.append(hole_ssim(out, img, hole))
                textures.append(hole_texture(out, img, hole))
                outs.append(out)
            results[name][setting] = {"psnr": round(float(np.mean(psnrs)), 3), "ssim": round(float(np.mean(ssims)), 4),
                                      "texture": round(float(np.nanmean(textures)), 4)}
            examples.setdefault(setting, {})[name] = np.stack(outs)
            log(f"  {name:<16} {setting:<9} PSNR {results[name][setting]['psnr']:6.2f} dB  "
                f"SSIM {results[name][setting]['ssim']:.4f}  texture {results[name][setting]['texture']:.3f}  "
                f"({time.perf_counter() - t0:.1f} s)")
    return results, examples


def table(results: dict) -> str:
    lines = ["| method | " + " | ".join(f"{s} PSNR (dB) | {s} SSIM | {s} texture" for s in SETTINGS) + " |",
             "|---|" + "---|---|---|" * len(SETTINGS)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s]['psnr']:.2f} | {row[s]['ssim']:.4f} | {row[s]['texture']:.3f}"
                                                 for s in SETTINGS) + " |")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ganforge bench inpaint", description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="results file")
    ap.add_argument("--images", default=None, help="folder of photos to test on (default: held-out photos)")
    ap.add_argument("--quick", action="store_true", help="12 crops instead of --n")
    ap.add_argument("--n", type=int, default=48, help="crops per setting")
    ap.add_argument("--size", type=int, default=64, help="crop side (default 64, the models' tile)")
    ap.add_argument("--model", action="append", default=None, metavar="LABEL=PATH",
                    help="a learned inpainter: run dir / checkpoint or Triton model dir (repeatable)")
    ap.add_argument("--no-classical", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = 12 if args.quick else args.n
    if n < 1:
        raise UsageError(f"--n: {n} is not allowed; must be >= 1")
    if args.size < 16:
        raise UsageError(f"--size: {args.size} is not allowed; must be >= 16")
    methods: dict[str, Callable] = {}
    if not args.no_classical:
        methods.update({"telea": telea, "navier-stokes": navier_stokes, "biharmonic": biharmonic})
    methods.update(load_models(args.model if args.model is not None else default_models()))
    images = test_set(args.images, n, args.size)
    masks = {s: make_masks(s, n, args.size) for s in SETTINGS}
    print(f"inpainting benchmark: {n} crops of {args.size}x{args.size} from "
          f"{args.images or 'held-out photos (chelsea, coffee)'}; hole share "
          + ", ".join(f"{s} {100 * (m > 0).mean():.1f}%" for s, m in masks.items()))
    results, examples = evaluate(methods, images, masks)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    # examples: per setting, 4 crops; columns = masked input, every method, ground truth
    from ganforge.images import save_grid

    rows = []
    for setting in SETTINGS:
        for i in range(min(4, n)):
            hole = masks[setting][i] > 0
            shown = images[i].copy()
            shown[hole] = 255
            rows.append([shown] + [examples[setting][name][i] for name in methods] + [images[i]])
    png = save_grid(np.stack([im for r in rows for im in r]), out.with_suffix(".png"), nrow=len(rows[0]))
    print(f"wrote {out}, {out.with_suffix('.md')} and {png} (columns: masked, "
          + ", ".join(methods) + ", original)")
    learned_names = [m for m in methods if m not in ("telea", "navier-stokes", "biharmonic")]
    classical = [m for m in methods if m in ("telea", "navier-stokes", "biharmonic")]
    if learned_names and classical:
        for s in SETTINGS:
            best_l = max(learned_names, key=lambda m: results[m][s]["psnr"])
            best_c = max(classical, key=lambda m: results[m][s]["psnr"])
            beats = all(results[best_l][s][k] > results[c][s][k] for c in classical for k in ("psnr", "ssim"))
            print(f"{s}: best learned {best_l} {results[best_l][s]['psnr']:.2f} dB vs best classical "
                  f"{best_c} {results[best_c][s]['psnr']:.2f} dB; beats every classical method on PSNR and SSIM: "
                  f"{'yes' if beats else 'no'}")
    return 0
