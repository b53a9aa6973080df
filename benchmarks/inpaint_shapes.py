"""`ganforge bench inpaint-shapes`: where learning matters, on structured images with large holes.

    ganforge bench inpaint-shapes --json shapes.json [--n 300] [--quick] [--model LABEL=PATH ...]

Test images: procedural shapes (training/datasets.py: one coloured circle, square, triangle or
diamond on a gradient) at 64 px, drawn from a seed no model trained on. Two settings, one centred
square hole per image covering 25 % (`centre25`) or 40 % (`centre40`) of it; a 40 % hole hides
most of the shape in most images, so its outline and colour must be inferred from what shows.

Methods: OpenCV Telea and Navier-Stokes (radius 3), scikit-image `inpaint_biharmonic`, and each
learned model given as `--model LABEL=PATH` (a run directory / checkpoint run in torch: context
encoder, masked autoencoder, inpaint pix2pix; or a Triton model directory holding
`1/model.onnx` run in ONNX Runtime, as `ganforge bench inpaint` runs them). Default models: the
runs `runs/context_encoder_shapes` (`ganforge train context-encoder --preset shapes`) and
`runs/pix2pix_shapes` (`ganforge train pix2pix --preset shapes`), the shipped context encoder
`model_repository/inpainter_shapes` and classical blend `model_repository/fill_thinplate`, where
present. Known pixels are kept by every
method.

Scores per method and setting: PSNR and SSIM over the hole (as `ganforge bench inpaint`), and
the shapes classifier's accuracy (training/metrics.py: shape and colour heads) on the completed
images, with its accuracy on the originals and the share of it kept (completed / original).
The same accuracy is given again over the images whose shape shows at least one pixel outside
the hole: where none does, nothing in the input tells the shape or its colour, so no method can
keep the classifier's accuracy on those, and their share (`hidden`, per setting) bounds what
any method keeps over all images.
Writes the JSON, the tables (stdout and `<json>.md`) and `<json>.png`: four images per setting,
columns masked input, every method, original.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ganforge import masks as maskgen
from ganforge.benchmarks.inpaint import biharmonic, evaluate, load_models, navier_stokes, telea
from ganforge.errors import UsageError

SETTINGS = {"centre25": 0.25, "centre40": 0.40}
SIZE = 64
TEST_SEED = 20240   # the test shapes' seed: training draws seed 0.., the classifier 1234 and 1235
CLASSICAL = ("telea", "navier-stokes", "biharmonic")


def default_models() -> list[str]:
    found = []
    if Path("runs/context_encoder_shapes/checkpoint.pt").is_file():
        found.append("context-encoder=runs/context_encoder_shapes")
    if Path("runs/pix2pix_shapes/checkpoint.pt").is_file():
        found.append("pix2pix=runs/pix2pix_shapes")
    for name in ("inpainter_shapes", "fill_thinplate"):
        if Path(f"model_repository/{name}/1/model.onnx").is_file():
            found.append(f"{name}=model_repository/{name}")
    return found


def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shapes classifier's (shape, colour) predictions for uint8 NHWC images."""
    import torch

    from ganforge.training.gan_task import to_tensor
    from ganforge.training.metrics import load_classifier

    model, _ = load_classifier()
    with torch.no_grad():
        out = [model(to_tensor(images[i:i + 256])) for i in range(0, len(images), 256)]
    return (torch.cat([o[1] for o in out]).argmax(1).numpy(), torch.cat([o[2] for o in out]).argmax(1).numpy())


def accuracy(images: np.ndarray, shape: np.ndarray, colour: np.ndarray) -> dict:
    s, c = classify(images)
    return {"shape": round(float((s == shape).mean()), 4), "colour": round(float((c == colour).mean()), 4),
            "both": round(float(((s == shape) & (c == colour)).mean()), 4)}


def wholly_hidden(images: np.ndarray, colour: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: no pixel of its shape lies outside the hole. A shape's pixels are exactly its
    palette colour (each has a channel >= 190; the background stays below 70)."""
    from ganforge.training import datasets

    palette = np.array(list(datasets.COLOURS.values()), np.uint8)[colour]
    shape_pixels = (images == palette[:, None, None, :]).all(-1)
    return ~(shape_pixels & (masks == 0)).any((1, 2))


def visible_table(results: dict, hidden: dict) -> str:
    head = ["method"] + [f"{s} {k}" for s in SETTINGS for k in ("shape acc", "colour acc")]
    shares = ", ".join(f"{s}: {100 * (1 - h):.0f} %" for s, h in hidden.items())
    lines = [f"Images whose shape shows outside the hole ({shares} of them):", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in results.items():
        cells = [name]
        for s in SETTINGS:
            v = row[s]["visible"]
            cells += [f"{100 * v['accuracy'][k]:.1f} % ({100 * v['kept'][k]:.0f} %)" for k in ("shape", "colour")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: dict, original: dict) -> str:
    head = ["method"] + [f"{s} {k}" for s in SETTINGS for k in ("PSNR (dB)", "SSIM", "shape acc", "colour acc")]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in results.items():
        cells = [name]
        for s in SETTINGS:
            r = row[s]
            cells += [f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
                      f"{100 * r['accuracy']['shape']:.1f} % ({100 * r['kept']['shape']:.0f} %)",
                      f"{100 * r['accuracy']['colour']:.1f} % ({100 * r['kept']['colour']:.0f} %)"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| originals (no hole) | " + " | ".join(
        f"- | - | {100 * original['shape']:.1f} % | {100 * original['colour']:.1f} %" for _ in SETTINGS) + " |")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ganforge bench inpaint-shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="results file")
    ap.add_argument("--n", type=int, default=300, help="test images per setting")
    ap.add_argument("--quick", action="store_true", help="24 images instead of --n")
    ap.add_argument("--model", action="append", default=None, metavar="LABEL=PATH",
                    help="a learned inpainter: run dir / checkpoint or Triton model dir (repeatable)")
    args = ap.parse_args(argv)
    n = 24 if args.quick else args.n
    if n < 1:
        raise UsageError(f"--n: {n} is not allowed; must be >= 1")
    from ganforge.training import datasets

    methods: dict[str, Callable] = {"telea": telea, "navier-stokes": navier_stokes, "biharmonic": biharmonic}
    methods.update(load_models(args.model if args.model is not None else default_models()))
    test = datasets.shapes(n, SIZE, seed=TEST_SEED)
    masks = {s: np.stack([maskgen.centre(SIZE, SIZE, a)] * n) for s, a in SETTINGS.items()}
    print(f"inpainting benchmark on shapes: {n} held-out images of {SIZE}x{SIZE} (seed {TEST_SEED}); hole share "
          + ", ".join(f"{s} {100 * (m > 0).mean():.1f}%" for s, m in masks.items()))
    results, examples = evaluate(methods, test.images, masks)
    original = accuracy(test.images, test.shape, test.colour)
    print(f"  classifier on the originals: shape {100 * original['shape']:.1f} %, colour {100 * original['colour']:.1f} %")
    hidden = {s: wholly_hidden(test.images, test.colour, masks[s]) for s in SETTINGS}
    shown = {s: ~h for s, h in hidden.items()}
    original_shown = {s: accuracy(test.images[v], test.shape[v], test.colour[v]) for s, v in shown.items()}
    print("  shapes wholly inside the hole: " + ", ".join(f"{s} {100 * h.mean():.1f} %" for s, h in hidden.items()))
    for name in methods:
        for s in SETTINGS:
            acc = accuracy(examples[s][name], test.shape, test.colour)
            results[name][s]["accuracy"] = acc
            results[name][s]["kept"] = {k: round(acc[k] / max(original[k], 1e-9), 4) for k in acc}
            v = shown[s]
            acc = accuracy(examples[s][name][v], test.shape[v], test.colour[v])
            results[name][s]["visible"] = {
                "images": int(v.sum()), "accuracy": acc,
                "kept": {k: round(acc[k] / max(original_shown[s][k], 1e-9), 4) for k in acc}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": n, "seed": TEST_SEED, "original_accuracy": original,
                               "hidden": {s: round(float(h.mean()), 4) for s, h in hidden.items()},
                               "original_accuracy_visible": original_shown, "methods": results},
                              indent=2) + "\n")
    text = table(results, original) + "\n\n" + visible_table(results, {s: float(h.mean()) for s, h in hidden.items()})
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    from ganforge.images import save_grid

    rows = []
    for s in SETTINGS:
        for i in range(min(4, n)):
            shown = test.images[i].copy()
            shown[masks[s][i] > 0] = 255
            rows.append([shown] + [examples[s][name][i] for name in methods] + [test.images[i]])
    png = save_grid(np.stack([im for r in rows for im in r]), out.with_suffix(".png"), nrow=len(rows[0]))
    print(f"wrote {out}, {out.with_suffix('.md')} and {png} (columns: masked, " + ", ".join(methods) + ", original)")
    learned_names = [m for m in methods if m not in CLASSICAL]
    for name in learned_names:
        others = [m for m in methods if m != name]
        for s in SETTINGS:
            r = results[name][s]
            best = max(others, key=lambda m: results[m][s]["psnr"])
            margin = r["psnr"] - results[best][s]["psnr"]
            print(f"{s}: {name} {r['psnr']:.2f} dB, {margin:+.2f} dB over the best other method ({best}); "
                  f"classifier accuracy kept: shape {100 * r['kept']['shape']:.0f} %, colour "
                  f"{100 * r['kept']['colour']:.0f} % (best other fill: shape "
                  f"{100 * max(results[m][s]['kept']['shape'] for m in others):.0f} %, colour "
                  f"{100 * max(results[m][s]['kept']['colour'] for m in others):.0f} %)")
    return 0
