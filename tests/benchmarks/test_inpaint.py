"""`ganforge bench inpaint`: hole-only metrics, JSON layout, classical and learned methods."""

import json

import numpy as np
import pytest

from ganforge.benchmarks import inpaint as bench
from ganforge.training.pix2pix import Pix2PixConfig, Pix2PixTrainConfig, train_pix2pix
from tests.conftest import run_cli


def test_hole_metrics_ignore_the_known_region():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    hole = np.zeros((32, 32), bool)
    hole[8:24, 8:24] = True
    out = ref.copy()
    out[~hole] = 0                       # wreck only the known region: the metrics do not move
    assert bench.hole_psnr(out, ref, hole) == 99.0
    out[hole] = np.clip(ref[hole].astype(int) + 16, 0, 255)
    assert 20 < bench.hole_psnr(out, ref, hole) < 25


def test_the_texture_figure_is_one_for_the_original_near_zero_for_a_flat_fill():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    hole = np.zeros((32, 32), bool)
    hole[8:24, 8:24] = True
    assert bench.hole_texture(ref, ref, hole) == pytest.approx(1.0)
    flat = ref.copy()
    flat[hole] = ref[hole].mean(axis=0).astype(np.uint8)
    assert bench.hole_texture(flat, ref, hole) < 0.2
    assert np.isnan(bench.hole_texture(ref, np.zeros_like(ref), hole))


def test_masks_of_each_setting_are_seeded_and_sized():
    a, b = bench.make_masks("freeform", 3, 64), bench.make_masks("freeform", 3, 64)
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])
    c = bench.make_masks("centre25", 2, 64)
    assert (c[0] > 0).mean() == pytest.approx(0.25)


def test_the_benchmark_writes_the_json_table_and_examples(tmp_path):
    train_pix2pix(Pix2PixTrainConfig(steps=1, batch_size=2, tile=32, n_images=8, threads=2,
                                     network=Pix2PixConfig(ngf=4, ndf=4, depth=5)), tmp_path / "p2p",
                  progress=False)
    out = tmp_path / "res" / "inpaint.json"
    assert bench.run(["--json", str(out), "--n", "2", "--size", "32", "--model", f"pix2pix={tmp_path / 'p2p'}"]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"telea", "navier-stokes", "biharmonic", "pix2pix"}
    for row in results.values():
        assert set(row) == {"centre25", "freeform"}
        assert all(set(v) == {"psnr", "ssim", "texture"} for v in row.values())
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| biharmonic |" in out.with_suffix(".md").read_text()


def test_a_bad_model_argument_is_one_error_line_and_exit_2(tmp_path):
    r = run_cli("bench", "inpaint", "--json", str(tmp_path / "x.json"), "--model", "nolabel")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "Error: --model: 'nolabel' is not allowed; expected LABEL=PATH"


def test_load_models_runs_a_pix2pix_and_a_masked_autoencoder_run_and_refuses_an_edges_pix2pix(tmp_path):
    from ganforge import masks as maskgen
    from ganforge.errors import UsageError
    from ganforge.training import datasets
    from ganforge.training.mae import MAETrainConfig, MAEUNetConfig, train_mae

    p2p = dict(steps=1, batch_size=2, tile=32, n_images=8, threads=1, doctor="off")
    train_pix2pix(Pix2PixTrainConfig(data="shapes", holes="centre", network=Pix2PixConfig(ngf=4, ndf=4, depth=5), **p2p),
                  tmp_path / "p2p", progress=False)
    train_mae(MAETrainConfig(steps=1, batch_size=2, tile=32, patch=4, n_images=8, threads=1,
                             network=MAEUNetConfig(width=8, depth=3, dilations=(1, 2))), tmp_path / "mae", progress=False)
    r = run_cli("bench", "inpaint", "--json", str(tmp_path / "b.json"), "--n", "1", "--size", "32", "--no-classical",
                "--model", f"m={tmp_path / 'mae'}")      # a fresh process: no training module imported before
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b.json").read_text())["m"]["centre25"]["psnr"] > 0
    logged = []
    methods = bench.load_models([f"p={tmp_path / 'p2p'}", f"m={tmp_path / 'mae'}"], log=logged.append)
    assert list(methods) == ["p", "m"] and "pix2pix, tile 32" in logged[0]
    assert "mae, any size (stride 8, min 32, max 1024)" in logged[1]     # the U-Net: the crop's own size
    image, mask = datasets.shapes(1, 32, seed=5).images[0], maskgen.centre(32, 32, 0.25)
    for fn in methods.values():
        out = fn(image, mask)
        assert out.shape == image.shape and np.array_equal(out[mask == 0], image[mask == 0])
        assert not np.array_equal(out[mask > 0], image[mask > 0])
    train_pix2pix(Pix2PixTrainConfig(network=Pix2PixConfig(task="edges", ngf=4, ndf=4, depth=5), **p2p),
                  tmp_path / "edges", progress=False)
    with pytest.raises(UsageError, match="^--model: .* holds a pix2pix 'edges' model; only a pix2pix trained "
                                         "with --task inpaint inpaints$"):
        bench.load_models([f"e={tmp_path / 'edges'}"])


def test_a_shape_is_wholly_hidden_only_when_none_of_its_pixels_is_outside_the_hole():
    from ganforge import masks as maskgen
    from ganforge.benchmarks.inpaint_shapes import wholly_hidden
    from ganforge.training import datasets

    test = datasets.shapes(32, 64, seed=20240)
    everything = np.full((32, 64, 64), 255, np.uint8)
    nothing = np.zeros((32, 64, 64), np.uint8)
    assert wholly_hidden(test.images, test.colour, everything).all()
    assert not wholly_hidden(test.images, test.colour, nothing).any()
    centre = np.stack([maskgen.centre(64, 64, 0.4)] * 32)
    hidden = wholly_hidden(test.images, test.colour, centre)
    palette = np.array(list(datasets.COLOURS.values()), np.uint8)
    for i in range(32):   # hidden: every pixel of the shape's colour lies in the hole
        own = (test.images[i] == palette[test.colour[i]]).all(-1)
        assert own.any() and hidden[i] == (not (own & (centre[i] == 0)).any())
    assert 0 < hidden.sum() < 32
