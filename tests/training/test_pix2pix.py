"""pix2pix: U-Net with skips, 70x70 PatchGAN, dropout as noise (drawn as one process draws it on
any number of ranks), a tiny run exported and checked, the command line as typed."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ganforge.errors import UsageError
from ganforge.export.image import UInt8Inpaint
from ganforge.export.triton import export_run
from ganforge.training.gan import dropout_masks, load_checkpoint
from ganforge.training.pix2pix import (PatchGAN, Pix2PixConfig, Pix2PixTrainConfig, UNet, edge_map,
                                       receptive_field, train_pix2pix)
from tests.conftest import run_cli

TINY = dict(ngf=4, ndf=4, depth=5)


def test_the_patchgan_sees_70x70_windows_and_answers_per_patch():
    D = PatchGAN(Pix2PixConfig(ndf=8))
    assert receptive_field(D) == 70
    logits = D(torch.zeros(2, 4, 64, 64), torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)          # one logit per patch, not one per image


def test_the_unet_maps_a_tile_to_a_tile_and_uses_its_skips():
    G = UNet(Pix2PixConfig(**TINY)).eval()
    x, m = torch.rand(1, 3, 64, 64) * 2 - 1, torch.zeros(1, 1, 64, 64)
    y = G(x, m)
    assert y.shape == (1, 3, 64, 64) and y.abs().max() <= 1
    # a skip from the first stage carries a local change to the output without the bottleneck
    x2 = x.clone()
    x2[..., 10, 10] = -x2[..., 10, 10]
    assert not torch.equal(G(x2, m), y)


def test_dropout_is_the_noise_in_training_and_off_in_eval():
    G = UNet(Pix2PixConfig(**TINY))
    x, m = torch.rand(2, 3, 64, 64), torch.zeros(2, 1, 64, 64)
    G.train()
    torch.manual_seed(0)
    a = G(x, m)
    b = G(x, m)
    assert not torch.equal(a, b)
    G.eval()
    assert torch.equal(G(x, m), G(x, m))


def test_edge_maps_are_binary_and_find_a_step():
    img = np.zeros((1, 16, 16, 3), np.uint8)
    img[:, :, 8:] = 200
    e = edge_map(img)
    assert e.shape == (1, 16, 16, 1) and set(np.unique(e)) <= {0, 255}
    assert e[0, :, 7:9].all() and not e[0, :, :5].any()


def test_bad_settings_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--task: 'colour' is not allowed; must be one of inpaint, edges"):
        train_pix2pix(Pix2PixTrainConfig(network=Pix2PixConfig(task="colour")), tmp_path)
    with pytest.raises(UsageError, match=r"--tile: 40 is not allowed; must be a multiple of 64 \(2 \*\* --depth\)"):
        train_pix2pix(Pix2PixTrainConfig(tile=40), tmp_path)
    with pytest.raises(UsageError, match="--tile: 16 is not allowed; must be >= 32"):
        train_pix2pix(Pix2PixTrainConfig(tile=16, network=Pix2PixConfig(depth=4)), tmp_path)
    with pytest.raises(UsageError, match="--dropout: 1.0 is not allowed; must be < 1"):
        train_pix2pix(Pix2PixTrainConfig(network=Pix2PixConfig(dropout=1.0)), tmp_path)


@pytest.fixture(scope="module")
def tiny_p2p(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2p")
    train_pix2pix(Pix2PixTrainConfig(steps=2, batch_size=2, tile=32, n_images=16, threads=2,
                                     network=Pix2PixConfig(**TINY)), tmp / "run", progress=False)
    return tmp


def test_a_tiny_inpainting_run_exports_with_known_pixels_byte_identical(tiny_p2p):
    summary = export_run(tiny_p2p / "run", tiny_p2p / "repo", name="p2p", tile=32, max_batch_size=4,
                         log=lambda m: None)
    assert summary["parity"]["max_abs_diff"] <= 1
    p = load_checkpoint(tiny_p2p / "run")
    assert p["kind"] == "pix2pix" and set(p["state"]) == {"net", "D"}
    manifest = json.loads((tiny_p2p / "repo" / "p2p" / "manifest.json").read_text())
    assert manifest["train_command"].startswith("ganforge train pix2pix ")
    assert "--task inpaint" in manifest["train_command"] and "--tile 32" in manifest["train_command"]
    net = UNet(Pix2PixConfig(**p["config"]))
    net.load_state_dict(p["state"]["net"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((3, 32, 32, 1), np.uint8)
    mask[:, 8:20, 4:30] = 255
    sess = ort.InferenceSession(summary["onnx"], providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": image, "mask": mask})[0]
    with torch.no_grad():
        ref = UInt8Inpaint(net.eval())(torch.from_numpy(image), torch.from_numpy(mask)).numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    known = mask[..., 0] == 0
    assert np.array_equal(out[known], image[known])


def test_an_edges_model_trains_but_has_no_served_contract(tiny_p2p):
    train_pix2pix(Pix2PixTrainConfig(steps=1, batch_size=2, tile=32, n_images=8, threads=2,
                                     network=Pix2PixConfig(task="edges", **TINY)), tiny_p2p / "edges",
                  progress=False)
    with pytest.raises(UsageError, match="only task 'inpaint'"):
        export_run(tiny_p2p / "edges", tiny_p2p / "repo", name="edges", tile=32, log=lambda m: None)


def test_the_doctor_watches_the_adversarial_part_of_both_inpainters(tmp_path):
    from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig, train_inpainter

    train_pix2pix(Pix2PixTrainConfig(steps=2, batch_size=2, tile=32, n_images=8, threads=2, doctor_every=1,
                                     network=Pix2PixConfig(**TINY)), tmp_path / "p2p", progress=False)
    train_inpainter(InpaintTrainConfig(steps=2, batch_size=2, tile=32, threads=2, doctor_every=1,
                                       network=ContextEncoderConfig(width=4, dilations=(2,), d_width=4)),
                    tmp_path / "ce", progress=False)
    for run in ("p2p", "ce"):
        recs = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [1, 2]
        assert all(0 <= r["s_G"] <= 1 and 0 <= r["s_D"] <= 1 and "diversity" in r for r in recs)
        assert (tmp_path / run / "scores.png").is_file() and (tmp_path / run / "doctor.md").is_file()


def test_the_unet_names_each_dropout_layer_with_the_shape_it_sees():
    G = UNet(Pix2PixConfig(**TINY)).train()
    seen = {}
    for layer, _ in G.noise(32):
        layer.register_forward_hook(lambda m, inp, out: seen.__setitem__(m, tuple(inp[0].shape[1:])))
    G(torch.zeros(2, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    assert len(G.noise(32)) == 3
    assert {m: shape for m, shape in G.noise(32)} == seen
    # a mask handed in is the noise: the same mask, the same output
    with dropout_masks(G.noise(32), 2, lambda n, *shape: torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))):
        a = G(torch.ones(2, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    with dropout_masks(G.noise(32), 2, lambda n, *shape: torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))):
        b = G(torch.ones(2, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    assert torch.equal(a, b) and all(layer.keep is None for layer, _ in G.noise(32))


def _photos(folder, n: int = 6):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_pix2pix_trains_from_the_command_line_on_a_folder(tmp_path):
    out = tmp_path / "edges"
    r = run_cli("train", "pix2pix", "--task", "edges", "--data", str(_photos(tmp_path / "photos")), "--steps", "2",
                "--batch-size", "2", "--tile", "32", "--ngf", "4", "--ndf", "4", "--depth", "5", "--doctor-every", "1",
                "--threads", "1", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained 2 steps in ") and f"samples {out / 'samples.png'}" in r.stdout
    assert re.search(r"^L1 to the target \d\.\d{4} \(last logged step\)$", r.stdout, re.M)
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "metrics.jsonl", "samples.png", "scores.png",
                                               "doctor.md", "train.json"}
    p = load_checkpoint(out)
    assert p["kind"] == "pix2pix" and set(p["state"]) == {"net", "D"} and p["step"] == 2
    assert p["config"] == {"task": "edges", "ngf": 4, "ndf": 4, "depth": 5, "dropout": 0.5}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("diversity" in r for r in rows)


def test_pix2pix_help_shows_its_own_options_and_refuses_another_models():
    r = run_cli("train", "pix2pix", "--help")
    assert r.returncode == 0
    for flag in ("--task", "--tile", "--lambda-l1", "--dropout", "--depth", "--n-images", "--doctor"):
        assert flag in r.stdout
    for flag in ("--n-points", "--pack", "--lr-g", "--z-dim"):
        assert flag not in r.stdout
    r = run_cli("train", "pix2pix", "--pack", "2", "--out", "runs/never")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["Error: unrecognized arguments: --pack 2"]


def test_an_older_runs_recorded_settings_give_a_command_that_parses():
    import shlex

    from ganforge.cli import parse_train_args
    from ganforge.training import options
    from ganforge.training.options import train_command

    old = {"data": "photos", "steps": 12000, "batch_size": 8, "tile": 64, "lambda_l1": 100.0, "lr": 0.0002,
           "n_images": 4096, "seed": 0, "threads": 0, "log_every": 25, "doctor_every": 100,
           "network": {"task": "inpaint", "ngf": 16, "ndf": 32, "depth": 6, "dropout": 0.5}}
    cmd = train_command("pix2pix", old, "runs/pix2pix_inpaint")
    assert cmd.startswith("ganforge train pix2pix ") and cmd.endswith("--out runs/pix2pix_inpaint")
    ns = vars(parse_train_args(shlex.split(cmd)[1:]))
    ns.pop("out")
    cfg = options.config_from(Pix2PixTrainConfig, "pix2pix", overrides=options.typed_values(Pix2PixTrainConfig, ns))
    assert (cfg.steps, cfg.batch_size, cfg.tile, cfg.network) == (12000, 8, 64, Pix2PixConfig())


def test_two_gloo_ranks_draw_the_noise_and_the_masks_of_one_process(tmp_path):
    from tests.training.test_engine import run_ranks
    from tests.training.test_mixtures import logged_rows_agree

    cfg = {"steps": 2, "batch_size": 4, "tile": 32, "n_images": 8, "sync_bn": True, "log_every": 1,
           "checkpoint_every": 100, "doctor_every": 2, "threads": 1, "network": TINY}
    one = run_ranks(1, "pix2pix", tmp_path / "one", cfg)[0]
    two = run_ranks(2, "pix2pix", tmp_path / "two", cfg)
    assert two[0]["knobs"] == two[1]["knobs"] == one["knobs"]
    # dropout drawn per rank moves the first step's L1 by about 1e-3; the shared draw agrees to 1e-6
    logged_rows_agree(tmp_path / "one", tmp_path / "two", steps=[1, 2])


def test_pix2pix_trains_on_holed_shapes_with_the_context_encoders_holes(tmp_path):
    from ganforge.training.pix2pix import Pairs, Pix2PixTask
    from ganforge.training.engine import Engine

    cfg = Pix2PixTrainConfig(data="shapes", holes="centre", steps=1, batch_size=2, tile=32, n_images=8, threads=1,
                             doctor="off", network=Pix2PixConfig(**TINY))
    task = Pix2PixTask(cfg, progress=False)
    Engine(cfg, tmp_path / "run", progress=False).start(task)
    pairs = task.dataset()
    assert isinstance(pairs, Pairs) and len(pairs) == 8
    item = pairs[(3, 0)][0]
    hole = item[..., 3] > 0
    rows, cols = np.nonzero(hole)
    assert item.shape == (32, 32, 4) and 0.19 <= hole.mean() <= 0.41          # a centre hole of 20-40 %
    assert abs(rows.min() + rows.max() - 31) <= 1 and abs(cols.min() + cols.max() - 31) <= 1    # centred
    summary = train_pix2pix(cfg, tmp_path / "run2", progress=False)
    assert summary["steps"] == 1 and load_checkpoint(tmp_path / "run2", ("pix2pix",))["train"]["holes"] == "centre"
