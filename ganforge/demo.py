"""`make demo`: train a small DCGAN on procedural shapes, export it, serve it from the real
tritonserver beside the models shipped in model_repository/, ask for images over gRPC, write
them to disk."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).resolve().parent.parent / "model_repository"


def run_demo(out: Path, steps: int = 1000) -> int:
    from ganforge.export.triton import export_generator
    from ganforge.images import save_grid, write_image
    from ganforge.serving.client import Client
    from ganforge.serving.server import LocalServer, ServerOptions, free_port
    from ganforge.training import options
    from ganforge.training.loop import TrainConfig, train_dcgan

    t0 = time.perf_counter()
    out = Path(out)
    run, repository, images_dir = out / "run", out / "model_repository", out / "generated"
    print(f"[1/4] training a DCGAN on procedural shapes for {steps} steps -> {run}", flush=True)
    cfg = options.config_from(TrainConfig, "dcgan", "demo", overrides={"steps": steps})
    summary = train_dcgan(cfg, run)
    print(f"      {summary['seconds']} s; training samples {summary['samples']}")

    print(f"[2/4] exporting to ONNX + Triton model directories -> {repository}", flush=True)
    if repository.exists():
        shutil.rmtree(repository)
    exported = export_generator(run, repository, name="dcgan_demo", log=lambda m: print("      " + m))
    shipped = []
    if SHIPPED.is_dir():  # serve the trained models of model_repository/ beside the demo's
        for d in sorted(SHIPPED.iterdir()):
            if (d / "config.pbtxt").is_file():
                shutil.copytree(d, repository / d.name)
                shipped.append(d.name)
        print(f"      + the shipped models: {', '.join(shipped)}")

    print("[3/4] starting tritonserver (nvidia-pytriton's binary, ganforge's onnxruntime backend)",
          flush=True)
    opts = ServerOptions(model_repository=repository, grpc_port=free_port(),
                         http_port=free_port(), metrics_port=free_port())
    images_dir.mkdir(parents=True, exist_ok=True)
    grids = []
    with LocalServer(opts) as server:
        print(f"      ready: gRPC {server.grpc_url}, metrics {server.metrics_url}")
        with Client(server.grpc_url) as client:
            models = ["dcgan_demo"] + [m for m in ("dcgan_shapes", "progan_shapes") if m in shipped]
            for model in models:
                print(f"[4/4] generating over gRPC: model {model}, seed 42, count 16", flush=True)
                images = client.generate(model, seed=42, count=16)
                again = client.generate(model, seed=42, count=16)
                other = client.generate(model, seed=7, count=16)
                for i, img in enumerate(images):
                    write_image(images_dir / f"{model}_seed42_{i:03d}.png", img)
                grids.append(save_grid(images, images_dir / f"{model}_seed42_grid.png", nrow=4))
                save_grid(other, images_dir / f"{model}_seed7_grid.png", nrow=4)
                print(f"      seed 42 twice: byte-identical = {np.array_equal(images, again)}; "
                      f"seed 7 differs = {not np.array_equal(images, other)}")
            z = np.random.default_rng(0).standard_normal((4, 64), np.float32)
            raw = client.generate_from_latent("dcgan_demo_generator", z)
            print(f"      raw generator (latent -> image) answered {raw.shape[0]} latents")
            grids += _image_models(client, shipped, images_dir)
    print(f"      export parity torch vs ONNX Runtime: max abs diff "
          f"{exported['parity']['max_abs_diff']} grey levels")
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s. Generated images: {images_dir}/")
    for g in grids:
        print(f"  {g}")
    return 0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()))


def _image_models(client, shipped: list[str], images_dir: Path) -> list[Path]:
    """Denoise and inpaint a held-out photo (never seen in training), and complete held-out
    shapes, with the shipped models."""
    paths = []
    if "denoiser_photos" in shipped:
        paths += _photo(client, shipped, images_dir)
    if "inpainter_shapes" in shipped:
        paths += _shapes(client, images_dir)
    return paths


def _photo(client, shipped: list[str], images_dir: Path) -> list[Path]:
    from skimage import data

    from ganforge import masks
    from ganforge.images import write_image

    photo = data.chelsea()
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 25, photo.shape), 0, 255).round().astype(np.uint8)
    print(f"[4/4] denoising a {photo.shape[1]}x{photo.shape[0]} held-out photo (noise sigma 25) "
          f"with denoiser_photos", flush=True)
    clean = client.denoise("denoiser_photos", noisy)
    print(f"      PSNR {_psnr(noisy, photo):.2f} dB noisy -> {_psnr(clean, photo):.2f} dB denoised")
    paths = [write_image(images_dir / "photo_noisy.png", noisy), write_image(images_dir / "photo_denoised.png", clean)]
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[60:110, 150:200] = 255
    mask[160:288, 260:388] |= masks.strokes(128, 128, seed=3)
    hole = mask > 0
    masked = photo.copy()
    masked[hole] = 255
    write_image(images_dir / "photo_masked.png", masked)
    # the context encoder paints the hole; the classical blend, the better photo fill measured
    # (docs/inpainting.md), shown beside it
    for model, what in (("inpainter_photos", "the context encoder"), ("fill_thinplate", "the classical blend")):
        if model not in shipped:
            continue
        print(f"[4/4] inpainting {100 * hole.mean():.1f} % of it with {model} ({what})", flush=True)
        filled = client.inpaint(model, photo, mask)
        print(f"      known pixels byte-identical = {np.array_equal(filled[~hole], photo[~hole])}; "
              f"PSNR over the hole {_psnr(filled[hole], photo[hole]):.2f} dB")
        paths.append(write_image(images_dir / f"photo_inpainted_{model}.png", filled))
    return paths


def _shapes(client, images_dir: Path) -> list[Path]:
    """Held-out procedural shapes with a centre hole of 25 %, completed by inpainter_shapes:
    masked input, completion and original, one row each."""
    from ganforge import masks
    from ganforge.images import save_grid
    from ganforge.training import datasets

    shapes = datasets.shapes(8, 64, seed=20240).images   # seeds never drawn in training
    mask = masks.centre(64, 64, 0.25)
    hole = mask > 0
    print("[4/4] completing 8 held-out shapes with a centre hole of 25 % with inpainter_shapes "
          "(the context encoder)", flush=True)
    filled = np.stack([client.inpaint("inpainter_shapes", s, mask) for s in shapes])
    masked = shapes.copy()
    masked[:, hole] = 255
    print(f"      PSNR over the holes {_psnr(filled[:, hole], shapes[:, hole]):.2f} dB")
    return [save_grid(np.concatenate([masked, filled, shapes]), images_dir / "shapes_inpainted_grid.png", nrow=8)]
