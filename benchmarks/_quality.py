"""Image-quality helpers shared by the denoising and inpainting benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def psnr(ref: np.ndarray, test: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB on the 0-255 scale, over the pixels where `where` (H, W) is true."""
    d = ref.astype(np.float64) - test.astype(np.float64)
    if where is not None:
        d = d[where]
    mse = float((d ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ssim(ref: np.ndarray, test: np.ndarray, where: np.ndarray | None = None) -> float:
    """Mean SSIM (scikit-image, 7x7 windows, per channel), over `where` when given."""
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(ref, test, channel_axis=-1, data_range=255, full=True)
    full = full.mean(axis=-1)
    return float(full[where].mean() if where is not None else full.mean())


def held_out_images(folder: str | None, quick: bool) -> tuple[list[np.ndarray], str]:
    """The photos a benchmark runs on: a user's folder, or scikit-image's held-out photos."""
    from ganforge.training import datasets

    if folder:
        photos = datasets.folder_photos(folder)
        return photos, f"folder {folder} ({len(photos)} images)"
    photos = datasets.skimage_photos(datasets.HELD_OUT_PHOTOS)
    return photos, f"scikit-image's held-out photos {', '.join(datasets.HELD_OUT_PHOTOS)}"


def table(results: dict, settings: list[str]) -> str:
    lines = [f"{'method':<20}" + "".join(f"{s:>22}" for s in settings)]
    for method, row in results.items():
        cells = "".join(f"{row[s]['psnr']:>12.2f} dB {row[s]['ssim']:>5.3f}" if s in row else f"{'-':>22}"
                        for s in settings)
        lines.append(f"{method:<20}{cells}")
    return "\n".join(lines)


def default_model(name: str) -> str:
    return str(Path("model_repository") / name / "1" / "model.onnx")
