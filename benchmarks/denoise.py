"""`ganforge bench denoise`: the learned denoiser vs scikit-image's classical denoisers.

    ganforge bench denoise --json denoise.json [--images DIR] [--model ONNX] [--quick]

Gaussian noise of σ = 15, 25, 50 (0-255 scale, seeded) on held-out photos (never cropped for
training; see docs/denoising.md). PSNR and SSIM of:
  * the denoiser, its exported ONNX model run tile by tile with ONNX Runtime (the same graph
    and tiling the server and client use);
  * `denoise_tv_chambolle` and `denoise_nl_means`, each tuned per σ on a training photo (a grid
    of weights / filter strengths; the best on that photo is used on the held-out ones).
Writes a table, the JSON `{"<method>": {"sigma<σ>": {"psnr": x, "ssim": y}}}` and a PNG of
examples side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ganforge.benchmarks._quality import default_model, held_out_images, psnr, ssim, table
from ganforge.errors import UsageError

SIGMAS = (15, 25, 50)


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    n = np.random.default_rng(seed).standard_normal(image.shape) * sigma
    return np.clip(image.astype(np.float64) + n, 0, 255)  # float: classical methods see no rounding


def tv(x: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return np.clip(denoise_tv_chambolle(x / 255.0, weight=weight, channel_axis=-1) * 255, 0, 255).round().astype(np.uint8)


def nlm(x: np.ndarray, h_factor: float, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    s = sigma / 255.0
    out = denoise_nl_means(x / 255.0, h=h_factor * s, sigma=s, patch_size=5, patch_distance=6,
                           fast_mode=True, channel_axis=-1)
    return np.clip(out * 255, 0, 255).round().astype(np.uint8)


TV_WEIGHTS = (0.03, 0.05, 0.08, 0.12, 0.18, 0.25)
NLM_FACTORS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2)


def tune(sigma: float, quick: bool) -> dict:
    """Best TV weight and NL-means strength for `sigma` on a crop of a training photo."""
    from ganforge.training import datasets

    ref = datasets.skimage_photos(("astronaut",))[0][64:320, 64:320] if not quick else \
        datasets.skimage_photos(("astronaut",))[0][96:224, 96:224]
    x = noisy(ref, sigma, seed=99)
    best_tv = max(TV_WEIGHTS, key=lambda w: psnr(ref, tv(x, w)))
    best_nlm = max(NLM_FACTORS, key=lambda f: psnr(ref, nlm(x, f, sigma)))
    return {"tv_weight": best_tv, "nlm_h_factor": best_nlm}


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ganforge bench denoise", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=None, help="folder of photos (default: held-out scikit-image photos)")
    p.add_argument("--model", default=default_model("denoiser_photos"), help="the denoiser's ONNX file")
    p.add_argument("--quick", action="store_true", help="one 160x160 crop per photo")
    p.add_argument("--json", default="denoise.json")
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    import onnxruntime as ort

    from ganforge.images import save_grid
    from ganforge.serving.tiles import run_tiled

    if not Path(a.model).is_file():
        raise UsageError(f"--model: {a.model} does not exist (export a denoiser or run `make models`)")
    t0 = time.perf_counter()
    photos, source = held_out_images(a.images, a.quick)
    if a.quick:
        photos = [ph[:160, :160] for ph in photos]
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    tile = sess.get_inputs()[0].shape[1]
    dae = lambda img: run_tiled(img, tile, lambda b: sess.run(None, {"image": b})[0], 16,
                                overlap=min(32, tile // 2), margin=min(10, tile // 4 - 1))
    results: dict = {"denoiser": {}, "tv_chambolle": {}, "nl_means": {}, "noisy": {}}
    tuning, examples = {}, []
    for sigma in SIGMAS:
        tuning[sigma] = tune(sigma, a.quick)
        scores = {m: [] for m in results}
        for i, ref in enumerate(photos):
            x = noisy(ref, sigma, seed=1000 * sigma + i)
            x8 = np.clip(np.round(x), 0, 255).astype(np.uint8)  # what a camera / file would hold
            outs = {"noisy": x8, "denoiser": dae(x8), "tv_chambolle": tv(x, tuning[sigma]["tv_weight"]),
                    "nl_means": nlm(x, tuning[sigma]["nlm_h_factor"], sigma)}
            for m, out in outs.items():
                scores[m].append((psnr(ref, out), ssim(ref, out)))
            if i == 0:
                crop = lambda im: im[:128, :128]
                examples += [crop(ref), crop(x8), crop(outs["tv_chambolle"]), crop(outs["nl_means"]), crop(outs["denoiser"])]
        for m, vals in scores.items():
            results[m][f"sigma{sigma}"] = {"psnr": round(float(np.mean([v[0] for v in vals])), 3),
                                           "ssim": round(float(np.mean([v[1] for v in vals])), 4)}
        print(f"sigma {sigma}: " + ", ".join(f"{m} {results[m][f'sigma{sigma}']['psnr']:.2f} dB" for m in results), flush=True)
    best_classical_25 = max(results["tv_chambolle"]["sigma25"]["psnr"], results["nl_means"]["sigma25"]["psnr"])
    report = {**results, "tuning": {str(k): v for k, v in tuning.items()}, "source": source,
              "model": a.model, "margin_over_best_classical_sigma25_db":
                  round(results["denoiser"]["sigma25"]["psnr"] - best_classical_25, 3),
              "wall_s": round(time.perf_counter() - t0, 1)}
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    png = Path(a.png) if a.png else Path(a.json).with_suffix(".png")
    save_grid(np.stack(examples), png, nrow=5)
    print()
    print(table({m: results[m] for m in ("noisy", "tv_chambolle", "nl_means", "denoiser")}, [f"sigma{s}" for s in SIGMAS]))
    print(f"\ndenoiser vs best classical at sigma 25: {report['margin_over_best_classical_sigma25_db']:+.2f} dB; "
          f"{source}; wall {report['wall_s']} s; wrote {a.json} and {png} (rows: clean, noisy, TV, NL-means, denoiser)")
    return 0
