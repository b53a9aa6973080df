import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ganforge.errors import RepositoryError
from ganforge.serving import repository as repo
from ganforge.serving.sampler import sample_latents
from ganforge.training.gan import build_dcgan, load_checkpoint
from ganforge.training.gan_task import to_uint8
from tests.conftest import TINY, run_cli


def test_onnx_generator_matches_torch_within_one_grey_level(tiny_run, tiny_repo):
    repository, summary = tiny_repo
    assert summary["parity"]["max_abs_diff"] <= 1
    G, _ = build_dcgan(load_checkpoint(tiny_run))
    z = np.random.default_rng(5).standard_normal((8, TINY["z_dim"])).astype(np.float32)
    with torch.no_grad():
        ref = to_uint8(G(torch.from_numpy(z)))
    sess = ort.InferenceSession(str(repository / "tiny_generator/1/model.onnx"))
    got = sess.run(["image"], {"latent": z})[0]
    assert got.dtype == np.uint8 and got.shape == (8, 64, 64, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_onnx_generator_has_a_dynamic_batch_dimension(tiny_repo):
    repository, _ = tiny_repo
    sess = ort.InferenceSession(str(repository / "tiny_generator/1/model.onnx"))
    z = sample_latents(1, 5, TINY["z_dim"])
    five = sess.run(None, {"latent": z})[0]
    one = sess.run(None, {"latent": z[:1]})[0]
    assert five.shape[0] == 5 and one.shape[0] == 1
    assert np.abs(five[:1].astype(int) - one.astype(int)).max() <= 1  # batch-independent (eval BN)


def test_export_writes_triton_configs_that_parse_with_tritons_schema(tiny_repo):
    repository, _ = tiny_repo
    gen = repo.read_config(repository / "tiny_generator/config.pbtxt")
    assert gen.platform == "onnxruntime_onnx" and gen.max_batch_size == 8
    assert [i.name for i in gen.input] == ["latent"] and list(gen.input[0].dims) == [TINY["z_dim"]]
    assert [o.name for o in gen.output] == ["image"] and list(gen.output[0].dims) == [64, 64, 3]
    assert gen.HasField("dynamic_batching")
    assert sorted(w.batch_size for w in gen.model_warmup) == [1, 8]
    for name, out in (("tiny", "image"), ("tiny_sampler", "latent")):
        cfg = repo.read_config(repository / f"{name}/config.pbtxt")
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8, name
        assert [(i.name, list(i.dims)) for i in cfg.input] == [("seed", [1]), ("index", [1])], name
        assert [o.name for o in cfg.output] == [out] and cfg.HasField("dynamic_batching"), name


def test_generators_get_two_instances_and_the_sampler_one(tiny_repo):
    repository, _ = tiny_repo
    counts = {name: [g.count for g in repo.read_config(repository / name / "config.pbtxt").instance_group]
              for name in ("tiny", "tiny_generator", "tiny_sampler")}
    assert counts == {"tiny": [2], "tiny_generator": [2], "tiny_sampler": [1]}


def test_seeded_model_is_the_sampler_then_the_generator_in_one_graph(tiny_run, tiny_repo):
    """NAME (seed, index -> image) == the generator on the numpy sampler's latents, and its
    first graph alone (NAME_sampler) gives exactly those latents."""
    repository, summary = tiny_repo
    seeds = np.array([[42], [42], [42], [7], [0]], np.int64)
    index = np.array([[0], [1], [2], [0], [5]], np.int64)
    z = np.concatenate([sample_latents(42, 3, TINY["z_dim"]), sample_latents(7, 1, TINY["z_dim"]),
                        sample_latents(0, 6, TINY["z_dim"])[5:]])
    sampler = ort.InferenceSession(str(repository / "tiny_sampler/1/model.onnx"))
    assert np.abs(sampler.run(None, {"seed": seeds, "index": index})[0] - z).max() <= 1e-6
    seeded = ort.InferenceSession(str(repository / "tiny/1/model.onnx"))
    got = seeded.run(["image"], {"seed": seeds, "index": index})[0]
    direct = ort.InferenceSession(str(repository / "tiny_generator/1/model.onnx")).run(None, {"latent": z})[0]
    assert got.shape == (5, 64, 64, 3) and np.array_equal(got, direct)
    manifest = json.loads((repository / "tiny/manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= 1 and manifest["graphs"] == ["tiny_sampler", "tiny_generator"]


def test_manifest_records_sha256_of_every_file_and_the_source(tiny_run, tiny_repo):
    repository, _ = tiny_repo
    manifest = json.loads((repository / "tiny_generator/manifest.json").read_text())
    assert set(manifest["files"]) == {"config.pbtxt", "1/model.onnx"}
    for rel, digest in manifest["files"].items():
        assert repo.sha256(repository / "tiny_generator" / rel) == digest
    assert manifest["source_checkpoint"] == str((tiny_run / "checkpoint.pt").resolve())
    assert manifest["config"]["z_dim"] == TINY["z_dim"]
    assert manifest["parity"]["max_abs_diff"] <= 1


def test_a_changed_model_file_is_caught_by_the_manifest(tiny_repo, tmp_path):
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(tiny_repo[0], copy)
    repo.check_repository(copy)  # untouched: fine
    with open(copy / "tiny_generator/1/model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match=r"model.onnx: changed since export"):
        repo.check_repository(copy)


def test_cli_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("hello")
    r = run_cli("export", str(bogus), "--repository", str(tmp_path / "repo"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: checkpoint: {bogus} is not a ganforge checkpoint")


def test_cli_export_refuses_zero_instances(tiny_run, tmp_path):
    r = run_cli("export", str(tiny_run), "--repository", str(tmp_path / "r"), "--instances", "0")
    assert r.returncode == 2
    assert "Error: --instances: 0 is not allowed; must be >= 1" in r.stderr
    assert not (tmp_path / "r").exists()


def test_cli_export_refuses_a_bad_model_name(tiny_run, tmp_path):
    r = run_cli("export", str(tiny_run), "--repository", str(tmp_path / "r"), "--name", "9 bad")
    assert r.returncode == 2
    assert "Error: --name: '9 bad' is not allowed" in r.stderr
