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
    """Denoise and inpaint a held-out photo (never seen in training) with the shipped models."""
    from ganforge import masks
    from ganforge.images import write_image

    if not {"denoiser_photos", "inpainter_photos"} <= set(shipped):
        return []
    from skimage import data

    photo = data.chelsea()
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 25, photo.shape), 0, 255).round().astype(np.uint8)
    print(f"[4/4] denoising a {photo.shape[1]}x{photo.shape[0]} held-out photo (noise sigma 25) "
          f"with denoiser_photos", flush=True)
    clean = client.denoise("denoiser_photos", noisy)
    print(f"      PSNR {_psnr(noisy, photo):.2f} dB noisy -> {_psnr(clean, photo):.2f} dB denoised")
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[60:110, 150:200] = 255
    mask[160:288, 260:388] |= masks.strokes(128, 128, seed=3)
    print(f"[4/4] inpainting {100 * (mask > 0).mean():.1f} % of it with inpainter_photos", flush=True)
    filled = client.inpaint("inpainter_photos", photo, mask)
    hole = mask > 0
    print(f"      known pixels byte-identical = {np.array_equal(filled[~hole], photo[~hole])}; "
          f"PSNR over the hole {_psnr(filled[hole], photo[hole]):.2f} dB")
    masked = photo.copy()
    masked[hole] = 255
    paths = [write_image(images_dir / name, img) for name, img in
             (("photo_noisy.png", noisy), ("photo_denoised.png", clean),
              ("photo_masked.png", masked), ("photo_inpainted.png", filled))]
    return [paths[1], paths[3]]
