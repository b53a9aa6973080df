"""The gpu overlay's build-engines init step, run here on a copy of the committed repository
with a stand-in for trtexec that records its arguments (trtexec itself needs a GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ganforge.serving import repository as repo

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "base" / "build-engines.sh"

FAKE_TRTEXEC = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
for a in "$@"; do case "$a" in --saveEngine=*) echo plan > "${a#--saveEngine=}";; esac; done
"""


def run_script(models: Path, tmp_path: Path, precision="fp16") -> subprocess.CompletedProcess:
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    env = {**os.environ, "MODEL_REPOSITORY": str(models), "TRTEXEC": str(fake),
           "TIMING_CACHE": str(tmp_path / "timing.cache"), "PRECISION": precision}
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_build_engines_builds_a_plan_per_onnx_model_and_switches_its_config(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "model_repository", models)
    configs = {d.name: repo.read_config(d / "config.pbtxt") for d in models.iterdir() if (d / "config.pbtxt").is_file()}
    any_size = sorted(n for n, c in configs.items() if any(d == -1 for i in c.input for d in i.dims))
    onnx_models = [n for n, c in configs.items() if c.platform == "onnxruntime_onnx" and n not in any_size
                   and not any(i.data_type == repo.DTYPES["INT64"] for i in c.input)]
    assert onnx_models and "dcgan_shapes_generator" in onnx_models and "dcgan_shapes" not in onnx_models
    assert "inpainter_shapes" in any_size
    out = run_script(models, tmp_path)
    assert out.returncode == 0, out.stderr
    for name in any_size:   # no fixed shape for trtexec: left on ONNX Runtime, untouched
        assert f"build-engines: {name} stays on ONNX Runtime (any height and width)" in out.stdout
        assert (models / name / "config.pbtxt").read_text() == (ROOT / "model_repository" / name / "config.pbtxt").read_text()
        assert not (models / name / "1" / "model.plan").exists()
    assert out.stdout.strip().endswith(f"built {len(onnx_models)} engines")
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert len(calls) == len(onnx_models)
    for name in onnx_models:
        cfg = repo.read_config(models / name / "config.pbtxt")   # still Triton's schema
        assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("tensorrt_plan", "tensorrt", "model.plan")
        assert (models / name / "1" / "model.plan").is_file()
        inp = cfg.input[0]
        dims = "x".join(str(d) for d in inp.dims)
        call = next(c for c in calls if f"/{name}/1/model.onnx" in c)
        assert f"--minShapes={inp.name}:1x{dims}" in call
        assert f"--maxShapes={inp.name}:{cfg.max_batch_size}x{dims}" in call
        assert "--fp16" in call and f"--timingCacheFile={tmp_path / 'timing.cache'}" in call
    # a second start finds the plans and builds nothing
    again = run_script(models, tmp_path)
    assert again.stdout.strip().endswith("built 0 engines")


def test_build_engines_fp32_passes_no_fp16_flag(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "model_repository", models)
    assert run_script(models, tmp_path, precision="fp32").returncode == 0
    assert "--fp16" not in (tmp_path / "bin" / "calls").read_text()


def test_build_engines_gives_trtexec_a_shape_for_every_input(tmp_path):
    models = tmp_path / "models"
    cfg = repo.onnx_model_config("inpaint_generator", [repo.tensor("image", "UINT8", [128, 128, 3]),
                                                       repo.tensor("mask", "UINT8", [128, 128, 1])],
                                 [repo.tensor("inpainted", "UINT8", [128, 128, 3])], 16)
    repo.write_config(models / "inpaint_generator", cfg)
    (models / "inpaint_generator" / "1").mkdir()
    (models / "inpaint_generator" / "1" / "model.onnx").write_bytes(b"onnx")
    assert run_script(models, tmp_path).returncode == 0
    (call,) = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert "--minShapes=image:1x128x128x3,mask:1x128x128x1" in call
    assert "--optShapes=image:8x128x128x3,mask:8x128x128x1" in call
    assert "--maxShapes=image:16x128x128x3,mask:16x128x128x1" in call


def test_build_engines_serves_a_seeded_generator_through_its_sampler_and_the_plan(tmp_path):
    """The seeded graph's uint64 sampler ops are not TensorRT's: NAME_sampler stays on ONNX
    Runtime and NAME becomes the ensemble NAME_sampler -> NAME_generator, which the real
    tritonserver loads and which answers exactly what the one-graph model answered."""
    import numpy as np

    from ganforge.serving.client import Client
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    models = tmp_path / "models"
    shutil.copytree(ROOT / "model_repository", models)
    out = run_script(models, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "dcgan_shapes -> ensemble dcgan_shapes_sampler (ONNX Runtime) -> dcgan_shapes_generator" in out.stdout
    calls = (tmp_path / "bin" / "calls").read_text()
    assert "/dcgan_shapes/1/model.onnx" not in calls and "/dcgan_shapes_sampler/" not in calls
    ens = repo.read_config(models / "dcgan_shapes" / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 64 and not ens.backend
    assert [(i.name, list(i.dims)) for i in ens.input] == [("seed", [1]), ("index", [1])]
    assert [(o.name, list(o.dims)) for o in ens.output] == [("image", [64, 64, 3])]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["dcgan_shapes_sampler", "dcgan_shapes_generator"]
    assert repo.read_config(models / "dcgan_shapes_sampler" / "config.pbtxt").platform == "onnxruntime_onnx"
    again = run_script(models, tmp_path)   # a restarted pod leaves the ensemble alone
    assert again.returncode == 0 and "dcgan_shapes ->" not in again.stdout

    # served here with the generator back on ONNX Runtime (a plan needs a GPU): the ensemble
    # config is valid to Triton and gives the one-graph model's images
    served = tmp_path / "served"
    served.mkdir()
    for name in ("dcgan_shapes_sampler", "dcgan_shapes_generator"):
        shutil.copytree(ROOT / "model_repository" / name, served / name)
    shutil.copytree(models / "dcgan_shapes", served / "dcgan_shapes")
    (served / "dcgan_shapes" / "manifest.json").unlink()   # its config was rewritten on purpose
    opts = ServerOptions(model_repository=served, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port(), startup_timeout_s=180)
    import onnxruntime as ort

    # the ensemble calls the generator's newest version; the one-graph model of that version
    newest = max(int(v.name) for v in (served / "dcgan_shapes_generator").iterdir() if v.name.isdigit())
    one_graph = ort.InferenceSession(str(ROOT / f"model_repository/dcgan_shapes/{newest}/model.onnx"))
    want = one_graph.run(None, {"seed": np.full((5, 1), 42, np.int64),
                                "index": np.arange(5, dtype=np.int64).reshape(5, 1)})[0]
    with LocalServer(opts) as server, Client(server.grpc_url) as client:
        assert np.array_equal(client.generate("dcgan_shapes", seed=42, count=5), want)


def test_build_engines_leaves_out_onnx_runtime_int8_versions(tmp_path):
    """TensorRT builds symmetric int8 only; an INT8 version from `ganforge export --precision
    int8` (uint8 activations with zero points) is removed from the node's copy, not built."""
    import json

    models = tmp_path / "models"
    shutil.copytree(ROOT / "model_repository", models)
    int8 = {d.name: v for d in models.iterdir() if (d / "manifest.json").is_file()
            for v, r in json.loads((d / "manifest.json").read_text()).get("versions", {}).items()
            if r["precision"] == "int8"}
    assert "denoiser_photos" in int8   # shipped with an INT8 version
    out = run_script(models, tmp_path)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "bin" / "calls").read_text()
    for name, v in int8.items():
        assert f"/{name}/{v}/model.onnx" not in calls
        if name == "dcgan_shapes":   # the seeded graph became an ensemble: no graph of its own runs
            continue
        assert f"build-engines: {name} version {v} is an ONNX Runtime INT8 graph: left out" in out.stdout
        assert not (models / name / v).exists() and (models / name / "1" / "model.plan").is_file()
