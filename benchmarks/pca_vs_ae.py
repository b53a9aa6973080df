"""`ganforge bench pca-vs-ae`: PCA (linear) vs the autoencoder (nonlinear PCA) at equal code size.

    ganforge bench pca-vs-ae --json pca_vs_ae.json [--quick]

Patterns are 8x8 RGB patches (D = 192, values in [0, 1]) cropped from scikit-image's training
photos; the error is measured on patches of the held-out photos. For each code size k (8, 16,
32, 64): PCA keeps the top-k principal directions (numpy SVD); the autoencoder
Y' = H(G(Y)) (192 → 512 → k → 512 → 192, ReLU) is trained on E. Reported: E per pattern,
E = Σ_i (Y_i − Y'_i)², on the same held-out patterns. Writes JSON, a plot and a PNG of
reconstructions side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CODES = (8, 16, 32, 64)
SIZE = 8


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ganforge bench pca-vs-ae", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer patterns and training steps")
    p.add_argument("--json", default="pca_vs_ae.json")
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    import torch

    from ganforge.images import save_grid
    from ganforge.training import datasets
    from ganforge.training.autoencoders import PCA, patches, reconstruction_error, train_autoencoder

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    n_train, n_test, steps = (20000, 2000, 400) if a.quick else (60000, 5000, 2000)
    train = patches(datasets.skimage_photos(datasets.TRAIN_PHOTOS), n_train, SIZE, seed=0)
    test = patches(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), n_test, SIZE, seed=1)
    results: dict = {"pca": {}, "autoencoder": {}}
    shown = [test[:8]]
    for k in CODES:
        pca = PCA.fit(train, k)
        rec_pca = pca.reconstruct(test)
        results["pca"][str(k)] = round(reconstruction_error(test, rec_pca) / len(test), 4)
        ae = train_autoencoder(train, k, steps=steps, seed=k)
        with torch.no_grad():
            rec_ae = ae(torch.from_numpy(test)).numpy()
        results["autoencoder"][str(k)] = round(reconstruction_error(test, rec_ae) / len(test), 4)
        shown += [rec_pca[:8], rec_ae[:8]]
        print(f"k={k:>3}: E per pattern  PCA {results['pca'][str(k)]:.4f}  AE {results['autoencoder'][str(k)]:.4f}",
              flush=True)
    report = {"E_per_pattern": results, "pattern": f"{SIZE}x{SIZE}x3 patches in [0, 1] (D = {SIZE * SIZE * 3})",
              "train_patterns": n_train, "test_patterns": n_test, "ae_steps": steps,
              "wall_s": round(time.perf_counter() - t0, 1)}
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, row in results.items():
        ax.plot(CODES, [row[str(k)] for k in CODES], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("code size k")
    ax.set_ylabel("E per held-out pattern")
    ax.legend()
    fig.tight_layout()
    plot = Path(a.png) if a.png else Path(a.json).with_suffix(".png")
    fig.savefig(plot, dpi=110)
    grid = np.clip(np.concatenate(shown) * 255 + 0.5, 0, 255).astype(np.uint8).reshape(-1, SIZE, SIZE, 3)
    grid = np.repeat(np.repeat(grid, 4, 1), 4, 2)
    rec_png = plot.with_name(plot.stem + "_reconstructions.png")
    save_grid(grid, rec_png, nrow=8)
    print(f"wall {report['wall_s']} s; wrote {a.json}, {plot} and {rec_png} "
          f"(rows: originals, then PCA and AE for k = {', '.join(map(str, CODES))})")
    return 0
