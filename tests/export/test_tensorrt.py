"""TensorRT export: the CPU-machine behaviour (one line, exit 1), the configs it and the ONNX
Runtime TensorRT provider write, and — on a GPU — plans checked against ONNX Runtime."""

from __future__ import annotations

import importlib.util
import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ganforge.serving import repository as repo
from tests.conftest import has_gpu, run_cli

NO_GPU_LINE = ("Error: export --format tensorrt: no NVIDIA GPU on this machine (nvidia-smi -L "
               "fails); TensorRT builds engines on the GPU that runs them: run this on a GPU machine\n")

cpu_only = pytest.mark.skipif(has_gpu(), reason="checks the behaviour on a machine without a GPU")
without_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                      reason="checks the behaviour where TensorRT is not installed")

LATENT = repo.tensor("latent", "FP32", [16])
IMAGE = repo.tensor("image", "UINT8", [64, 64, 3])


@cpu_only
def test_tensorrt_export_without_a_gpu_says_so_in_one_line_and_exits_1(tiny_run, tmp_path):
    out = run_cli("export", str(tiny_run), "--format", "tensorrt", "--fp16",
                  "--repository", str(tmp_path / "repo"))
    assert out.returncode == 1
    assert out.stderr == NO_GPU_LINE
    assert not (tmp_path / "repo").exists()  # nothing half-written


@cpu_only
def test_tensorrt_benchmark_without_a_gpu_measures_nothing_and_says_why(tiny_run, tmp_path):
    out = run_cli("bench", "tensorrt", str(tiny_run), "--out", str(tmp_path / "t.json"))
    assert out.returncode == 1
    assert out.stderr == ("bench tensorrt: no NVIDIA GPU on this machine (nvidia-smi -L fails); "
                          "nothing measured\n")
    assert not (tmp_path / "t.json").exists()


@cpu_only
def test_tensorrt_int8_export_without_a_gpu_says_so_and_bf16_is_a_usage_error(tiny_run, tmp_path):
    out = run_cli("export", str(tiny_run), "--format", "tensorrt", "--precision", "int8",
                  "--repository", str(tmp_path / "repo"))
    assert out.returncode == 1 and out.stderr == NO_GPU_LINE
    out = run_cli("export", str(tiny_run), "--format", "tensorrt", "--precision", "bf16",
                  "--repository", str(tmp_path / "repo"))
    assert out.returncode == 2
    assert out.stderr == ("Error: --precision: bf16 is not allowed with --format tensorrt; "
                          "allowed: fp32, fp16, int8\n")
    assert not (tmp_path / "repo").exists()


def test_the_int8_plans_graph_is_symmetric_qdq_from_the_exports_calibration(tiny_repo, tmp_path):
    """What TensorRT's explicit quantization builds: Q/DQ pairs with int8 zero points of 0 on
    activations and weights; ONNX Runtime runs the same graph close to the FP32 one."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ganforge.export import quantize
    from ganforge.export import tensorrt as trtx
    from ganforge.serving import sampler

    shared, summary = tiny_repo
    fp32 = shared / summary["generator"] / "1" / "model.onnx"
    calibrated = trtx.quantized_for_tensorrt(fp32, tmp_path / "int8.onnx", calibration=32, seed=3)
    assert (calibrated["samples"], calibrated["seed"]) == (32, 3)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) >= 8
    for n in qdq:
        zero = inits[n.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), (n.name, zero)
    z = sampler.sample_latents(0, 8, int(quantize._shape(model, "latent")[0]))
    ref = quantize.session(fp32).run(None, {"latent": z})[0].astype(np.int16)
    got = quantize.session(tmp_path / "int8.onnx").run(None, {"latent": z})[0].astype(np.int16)
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 6


@pytest.mark.gpu
@without_tensorrt
def test_tensorrt_export_and_benchmark_on_a_gpu_without_tensorrt_say_how_to_install_it(tiny_run, tmp_path):
    out = run_cli("export", str(tiny_run), "--format", "tensorrt", "--repository", str(tmp_path / "repo"))
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("Error: TensorRT is not installed (")
    assert "pip install 'ganforge[gpu]'" in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "repo").exists()  # nothing half-written
    out = run_cli("bench", "tensorrt", str(tiny_run), "--out", str(tmp_path / "t.json"))
    assert out.returncode == 1 and out.stderr.startswith("bench tensorrt: TensorRT is not installed ("), out.stderr
    assert not (tmp_path / "t.json").exists()


def test_tensorrt_plan_config_parses_with_tritons_schema(tmp_path):
    path = repo.write_config(tmp_path / "g_trt", repo.tensorrt_model_config("g_trt", [LATENT], [IMAGE], 64))
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("tensorrt_plan", "tensorrt", "model.plan")
    assert cfg.max_batch_size == 64
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [w.batch_size for w in cfg.model_warmup] == [1, 64]


def test_ort_tensorrt_accelerator_renders_the_onnxruntime_backend_keys(tmp_path):
    cfg = repo.add_ort_tensorrt(repo.onnx_model_config("g", [LATENT], [IMAGE], 8), "fp16",
                                engine_cache_path="/tmp/cache/g")
    text = (repo.write_config(tmp_path / "g", cfg)).read_text()
    parsed = text_format.Parse(text, mc.ModelConfig())
    (acc,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert dict(acc.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
                                    "trt_engine_cache_enable": "1",
                                    "trt_engine_cache_path": "/tmp/cache/g",
                                    "trt_timing_cache_enable": "1",
                                    "trt_timing_cache_path": "/tmp/cache/g"}
    assert 'gpu_execution_accelerator {\n      name: "tensorrt"' in text


def test_ort_tensorrt_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="precision 'INT4'; allowed: FP32, FP16"):
        repo.add_ort_tensorrt(repo.onnx_model_config("g", [LATENT], [IMAGE], 8), "int4")


def test_onnx_export_with_ort_trt_writes_the_accelerator_and_still_serves_the_same_graph(tiny_run, tmp_path):
    out = run_cli("export", str(tiny_run), "--repository", str(tmp_path / "repo"), "--name", "t",
                  "--max-batch-size", "4", "--ort-trt", "fp32")
    assert out.returncode == 0, out.stderr
    configs = repo.check_repository(tmp_path / "repo")   # parses every config, verifies manifests
    acc = configs["t_generator"].optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in acc] == ["tensorrt"]
    assert acc[0].parameters["precision_mode"] == "FP32"
    assert acc[0].parameters["trt_engine_cache_path"] == "/tmp/ganforge-trt-cache/t_generator"


def test_export_refuses_an_unknown_ort_trt_precision(tiny_run, tmp_path):
    out = run_cli("export", str(tiny_run), "--repository", str(tmp_path / "r"), "--ort-trt", "int8")
    assert out.returncode == 2
    assert out.stderr.startswith("Error: argument --ort-trt: invalid choice: 'int8'")


# -- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_matches_onnxruntime_within_the_stated_tolerance(tiny_repo, precision, tmp_path):
    import shutil

    from ganforge.export import tensorrt as trtx

    shared, summary = tiny_repo
    repository = tmp_path / "repo"          # the session's repository stays ONNX-only
    shutil.copytree(shared, repository)
    info = trtx.write_plan_model(repository, summary["generator"], precision=precision,
                                 calibration=32, fd_samples=200, log=print)
    check = info["parity_vs_onnxruntime"]
    if precision == "fp16":
        assert check["max_abs_diff"] <= trtx.FP16_MAX_ABS_DIFF
        assert check["mean_abs_diff"] <= trtx.FP16_MEAN_ABS_DIFF
    elif precision == "fp32":
        assert check["max_abs_diff"] <= trtx.FP32_MAX_ABS_DIFF
    manifest = json.loads((repository / info["model"] / "manifest.json").read_text())
    assert manifest["tensorrt_version"] and manifest["compute_capability"].count(".") == 1
    assert manifest["precision"] == precision.upper()
    assert (manifest["quality"] is None) == (precision == "fp32")
    assert (manifest["calibration"] is not None) == (precision == "int8")
    repo.verify_manifest(repository / info["model"])


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_export_cli_writes_a_plan_model_and_its_ensemble(tiny_run, tmp_path):
    out = run_cli("export", str(tiny_run), "--format", "tensorrt", "--repository",
                  str(tmp_path / "repo"), "--name", "t", "--max-batch-size", "16")
    assert out.returncode == 0, out.stderr
    configs = repo.check_repository(tmp_path / "repo")
    assert configs["t_generator_trt"].platform == "tensorrt_plan"
    steps = [s.model_name for s in configs["t_trt"].ensemble_scheduling.step]
    assert steps == ["t_sampler", "t_generator_trt"]
