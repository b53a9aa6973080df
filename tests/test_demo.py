"""`make demo`'s flow, shortened: train, export, serve, generate over gRPC, write PNGs."""

import pytest
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_trains_exports_serves_and_writes_generated_grids(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--steps", "4", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "seed 42 twice: byte-identical = True; seed 7 differs = True" in r.stdout
    last = r.stdout.strip().splitlines()
    assert f"  {out / 'generated' / 'dcgan_demo_seed42_grid.png'}" in last
    for model in ("dcgan_demo", "dcgan_shapes", "progan_shapes"):
        grid = Image.open(out / "generated" / f"{model}_seed42_grid.png")
        assert grid.size == (4 * 66 + 2, 4 * 66 + 2)
    assert len(list((out / "generated").glob("dcgan_demo_seed42_0*.png"))) == 16
    # the shipped denoiser and inpainters on a held-out photo: the context encoder and the
    # classical blend, each keeping every known pixel
    assert r.stdout.count("known pixels byte-identical = True") == 2
    assert "with inpainter_photos (the context encoder)" in r.stdout
    for name in ("photo_denoised.png", "photo_inpainted_inpainter_photos.png", "photo_inpainted_fill_thinplate.png"):
        assert Image.open(out / "generated" / name).size == (451, 300)
        assert f"  {out / 'generated' / name}" in last
    # held-out shapes completed by the shapes context encoder: masked, completed, originals
    assert "with inpainter_shapes" in r.stdout
    assert Image.open(out / "generated" / "shapes_inpainted_grid.png").size == (8 * 66 + 2, 3 * 66 + 2)
