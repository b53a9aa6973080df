"""The models committed in model_repository/, served as a fresh clone serves them: `ganforge
denoise` and `ganforge inpaint` with their default models on a held-out photo (never cropped for
training), through the real tritonserver."""

import json

import numpy as np
import pytest
from PIL import Image

from ganforge.serving.server import LocalServer, ServerOptions, free_port
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow
REPO = ROOT / "model_repository"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def server():
    s = LocalServer(ServerOptions(model_repository=REPO, grpc_port=free_port(), http_port=free_port(),
                                  metrics_port=free_port())).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.chelsea()  # 300x451, one of the held-out photos


def test_every_shipped_model_has_its_training_command_and_source(server):
    for name in ("dcgan_shapes_generator", "progan_shapes_generator", "denoiser_photos", "fill_thinplate",
                 "inpainter_photos", "inpainter_shapes"):
        manifest = json.loads((REPO / name / "manifest.json").read_text())
        assert manifest["train_command"].startswith("ganforge train "), name
        assert len(manifest["source_commit"]) == 40 and not manifest["source_commit"].endswith("dirty"), name
        assert manifest["parity"]["max_abs_diff"] <= 1, name


def test_default_denoiser_cleans_a_noisy_held_out_photo(server, photo, tmp_path):
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 25, photo.shape), 0, 255).round().astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    r = run_cli("denoise", str(tmp_path / "noisy.png"), "-o", str(tmp_path / "clean.png"), "--url", server.grpc_url)
    assert r.returncode == 0, r.stderr
    out = np.asarray(Image.open(tmp_path / "clean.png"))
    assert out.shape == photo.shape
    before, after = psnr(noisy, photo), psnr(out, photo)
    assert after > before + 5, f"PSNR {before:.2f} dB noisy -> {after:.2f} dB denoised"


@pytest.mark.parametrize("model", [None, "inpainter_photos"])   # None: the default, fill_thinplate
def test_photo_inpainters_fill_holes_and_keep_every_known_byte(server, photo, tmp_path, model):
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[100:124, 200:224] = 255  # a 24x24 hole
    mask[240:250, 30:90] = 255  # a thin stroke
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = run_cli("inpaint", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                "-o", str(tmp_path / "out.png"), "--url", server.grpc_url, *(["--model", model] if model else []))
    assert r.returncode == 0, r.stderr
    out = np.asarray(Image.open(tmp_path / "out.png"))
    hole = mask > 0
    assert np.array_equal(out[~hole], photo[~hole])
    # a plausible fill: far closer to the photo than a flat grey hole would be
    grey = photo.copy()
    grey[hole] = 128
    assert psnr(out[hole], photo[hole]) > psnr(grey[hole], photo[hole]) + 5


def test_shipped_progan_serves_by_seed_deterministically(server):
    from ganforge.serving.client import Client

    manifest = json.loads((REPO / "progan_shapes_generator" / "manifest.json").read_text())
    assert manifest["kind"] == "progan" and manifest["train_command"].startswith("ganforge train progan ")
    with Client(server.grpc_url) as c:
        a, b = c.generate("progan_shapes", seed=42, count=8), c.generate("progan_shapes", seed=42, count=8)
        other = c.generate("progan_shapes", seed=43, count=8)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, other)
    assert len({img.tobytes() for img in a}) == 8 and a.std() > 20   # eight different, not flat, images


def test_the_shapes_context_encoder_paints_what_a_classical_fill_cannot(server):
    """Held-out shapes with a centre hole of 25 %: the served context encoder paints the hole
    closer to the original than scikit-image's biharmonic fill, the best classical one on this
    data (docs/inpainting.md)."""
    from skimage.restoration import inpaint_biharmonic

    from ganforge import masks
    from ganforge.serving.client import Client
    from ganforge.training import datasets

    assert json.loads((REPO / "inpainter_shapes" / "manifest.json").read_text())["any_size"]
    shapes = datasets.shapes(16, 64, seed=20240).images
    mask = masks.centre(64, 64, 0.25)
    hole = mask > 0
    with Client(server.grpc_url) as c:
        painted = np.stack([c.inpaint("inpainter_shapes", s, mask) for s in shapes])
    classical = np.stack([(inpaint_biharmonic(s, hole, channel_axis=-1) * 255).round().astype(np.uint8)
                          for s in shapes])
    assert np.array_equal(painted[:, ~hole], shapes[:, ~hole])
    network, biharmonic = psnr(painted[:, hole], shapes[:, hole]), psnr(classical[:, hole], shapes[:, hole])
    assert network > biharmonic + 1, f"hole PSNR {network:.2f} dB against biharmonic's {biharmonic:.2f}"
