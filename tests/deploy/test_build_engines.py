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
    onnx_models = [d.name for d in models.iterdir()
                   if (d / "config.pbtxt").is_file() and repo.read_config(d / "config.pbtxt").platform == "onnxruntime_onnx"]
    assert onnx_models
    out = run_script(models, tmp_path)
    assert out.returncode == 0, out.stderr
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
