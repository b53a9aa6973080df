"""Reduced-precision exports: INT8 keeps the uint8 NHWC contract and is served by the real
tritonserver beside the FP32 version, the manifest records precision and calibration, the
parity and quality figures are computed and a quality cost over the limit warns."""

import json

import numpy as np
import onnx
import pytest

from ganforge.export import quantize, rewrites
from ganforge.export.triton import export_run
from ganforge.serving import repository as repo
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from ganforge.training.autoencoders import DenoiserConfig, DenoiserTrainConfig, train_denoiser
from tests.conftest import run_cli

TILE = 32


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    """A tiny trained denoiser, exported at FP32 as version 1, then INT8 as version 2 of the
    same model directory with `ganforge export MODEL_DIR --precision int8`."""
    tmp = tmp_path_factory.mktemp("quantize")
    train_denoiser(DenoiserTrainConfig(steps=3, batch_size=4, patch=24, threads=2,
                                       network=DenoiserConfig(width=8, depth=3)), tmp / "dn", progress=False)
    r = tmp / "model_repository"
    export_run(tmp / "dn", r, name="dn", tile=TILE, max_batch_size=4, log=lambda m: None)
    out = run_cli("export", str(r / "dn"), "--precision", "int8", "--calibration", "16",
                  "--calibration-seed", "3")
    return tmp, r, out


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_int8_export_of_a_model_directory_adds_a_version_with_the_same_contract(denoiser):
    _, r, out = denoiser
    assert out.returncode == 0, out.stderr
    assert "exported dn version 2 (int8)" in out.stdout
    fp32 = onnx.load(r / "dn" / "1" / "model.onnx").graph
    int8 = onnx.load(r / "dn" / "2" / "model.onnx").graph
    io = lambda g: [(t.name, t.type.tensor_type.elem_type, [d.dim_value for d in t.type.tensor_type.shape.dim[1:]])
                    for t in (*g.input, *g.output)]
    assert io(int8) == io(fp32) == [("image", onnx.TensorProto.UINT8, [TILE, TILE, 3]),
                                    ("denoised", onnx.TensorProto.UINT8, [TILE, TILE, 3])]
    ops = [n.op_type for n in int8.node]
    assert ops.count("QuantizeLinear") >= 3 and ops[-1] == "Transpose"     # uint8 tail left as it was
    cfg = repo.read_config(r / "dn" / "config.pbtxt")
    assert cfg.version_policy.HasField("all")
    repo.check_repository(r)   # every file of both versions matches the manifest


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_the_manifest_records_precision_calibration_parity_and_quality(denoiser):
    _, r, out = denoiser
    m = json.loads((r / "dn" / "manifest.json").read_text())
    assert m["versions"]["1"] == {"precision": "fp32"}
    v2 = m["versions"]["2"]
    assert v2["precision"] == "int8"
    assert v2["calibration"]["n"] == 16 and v2["calibration"]["seed"] == 3
    assert "training crops" in v2["calibration"]["data"] and "noise" in v2["calibration"]["data"]
    assert v2["parity_fp32"]["inputs"] == 32
    assert 0 <= v2["parity_fp32"]["mean_abs_diff"] <= v2["parity_fp32"]["max_abs_diff"] <= 255
    q = v2["quality"]
    assert q["metric"].startswith("PSNR at sigma 25") and q["limit"] == 0.2 and q["unit"] == "dB"
    assert q["loss"] == pytest.approx(q["fp32"] - q["int8"], abs=2e-3)
    assert f"int8 vs fp32 on 32 held-out inputs: max abs diff {v2['parity_fp32']['max_abs_diff']} grey levels" in out.stdout
    assert f"fp32 {q['fp32']}, int8 {q['int8']}" in out.stdout


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_int8_and_fp32_versions_are_served_side_by_side_by_the_real_tritonserver(denoiser):
    import tritonclient.grpc as grpcclient

    _, r, _ = denoiser
    x = np.random.default_rng(0).integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    expected = {v: quantize.session(r / "dn" / v / "model.onnx").run(None, {"image": x})[0] for v in ("1", "2")}
    assert not np.array_equal(expected["1"], expected["2"])   # two different graphs answer
    srv = LocalServer(ServerOptions(model_repository=r, grpc_port=free_port(), http_port=free_port(),
                                    metrics_port=free_port(), exit_timeout_s=5)).start()
    try:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        inp = grpcclient.InferInput("image", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        for version in ("1", "2", ""):
            got = client.infer("dn", [inp], model_version=version).as_numpy("denoised")
            assert got.dtype == np.uint8 and got.shape == x.shape
            np.testing.assert_array_equal(got, expected[version or "2"])   # unversioned: the newest
    finally:
        srv.stop()


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_a_quality_cost_over_the_limit_warns_and_exports(denoiser, tmp_path):
    tmp, _, _ = denoiser
    out = run_cli("export", str(tmp / "dn"), "--repository", str(tmp_path), "--name", "dn8", "--tile", str(TILE),
                  "--max-batch-size", "4", "--precision", "int8", "--calibration", "16", "--max-loss", "-5")
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and "over the limit of -5.0 dB" in warning[0]
    loss = json.loads((tmp_path / "dn8" / "manifest.json").read_text())["versions"]["1"]["quality"]["loss"]
    assert f"costs {loss:.3f} dB of PSNR, {loss + 5:.3f} dB over the limit" in warning[0]


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_within_the_limit_there_is_no_warning(denoiser, tmp_path):
    _, r, _ = denoiser
    out = run_cli("export", str(r / "dn"), "--repository", str(tmp_path), "--name", "dn16",
                  "--precision", "fp16", "--max-loss", "5")
    assert out.returncode == 0, out.stderr
    assert "Warning:" not in out.stderr
    v = json.loads((tmp_path / "dn16" / "manifest.json").read_text())["versions"]["1"]
    assert v["precision"] == "fp16" and v["parity_fp32"]["max_abs_diff"] <= 2


def test_a_bad_precision_is_a_one_line_usage_error():
    out = run_cli("export", "runs/none", "--precision", "int4")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "Error: argument --precision: invalid choice: 'int4' (choose from 'fp32', 'int8', 'fp16', 'bf16')"]


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_converting_the_fp32_version_onto_itself_is_refused(denoiser):
    _, r, _ = denoiser
    out = run_cli("export", str(r / "dn"), "--precision", "int8", "--version", "1")
    assert out.returncode == 2
    assert out.stderr.strip() == "Error: --version: 1 is the FP32 version this export reads; choose another"


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_convtranspose_rewritten_as_conv_gives_the_same_images(tiny_repo):
    r, _ = tiny_repo
    src = r / "tiny_generator" / "1" / "model.onnx"
    model = rewrites.convtranspose_as_conv(onnx.load(src))
    assert "ConvTranspose" not in {n.op_type for n in model.graph.node}
    feeds, _ = quantize.sample_inputs(onnx.load(src), 16, 0)
    import onnxruntime as ort

    rewritten = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert quantize.output_diff(quantize.session(src), rewritten, feeds)["max_abs_diff"] <= 1


@pytest.mark.slow
def test_bench_quantize_quick_writes_its_figures(denoiser, tmp_path):
    _, r, _ = denoiser
    path = tmp_path / "q.json"
    out = run_cli("bench", "quantize", "--json", str(path), "--quick", "--repository", str(r),
                  "--models", "dn", "--precisions", "int8", "--seconds", "0.2")
    assert out.returncode == 0, out.stderr
    report = json.loads(path.read_text())
    assert len(report["load_average_before"]) == 3 and len(report["load_average_after"]) == 3
    dn = report["models"]["dn"]
    for p in ("fp32", "int8"):
        assert dn[p]["inprocess"]["b1_images_per_s"] > 0 and dn[p]["inprocess"]["b16_images_per_s"] > 0
        assert dn[p]["inprocess"]["b16_batch"] == 4   # the tiny model's max_batch_size
        assert dn[p]["served"]["served_b16_images_per_s"] > 0 and dn[p]["served"]["errors"] == 0
    assert dn["fp32"]["inprocess"]["b16_speedup"] == 1.0
    assert dn["int8"]["quality"]["unit"] == "dB" and "max_abs_diff" in dn["int8"]["parity_fp32"]
    assert "dn_int8_served_vs_inprocess" in report["goals"]


@pytest.mark.slow   # trains and exports a tiny model (module fixture)
def test_bf16_without_a_cpu_kernel_stops_with_the_runtime_reason_and_leaves_nothing(denoiser, tmp_path):
    _, r, _ = denoiser
    out = run_cli("export", str(r / "dn"), "--repository", str(tmp_path), "--name", "dnbf", "--precision", "bf16")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: export: --precision bf16: ONNX Runtime's CPU provider cannot load") and "Conv" in last
    assert not (tmp_path / "dnbf").exists()   # a model directory without a version would stop a server


@pytest.mark.parametrize("K,s,p,side", [(4, 2, 1, 5), (4, 2, 1, 1), (4, 1, 0, 1), (3, 1, 1, 6), (4, 2, 0, 3),
                                        (6, 2, 2, 4), (8, 4, 2, 3), (6, 2, 1, 3), (3, 3, 0, 4)])
def test_every_convtranspose_rewrite_gives_the_transposed_convs_sums(K, s, p, side):
    """The Gemm (1x1 input), the per-phase Conv with its crop, and the one-window Conv (kernel
    not divisible by the stride) against ONNX Runtime's own ConvTranspose."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(K * 100 + s * 10 + p)
    W = rng.standard_normal((3, 5, K, K)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "net.weight", "net.bias"], ["y"], strides=[s, s],
                            pads=[p] * 4, kernel_shape=[K, K])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "c", "h", "w"])],
                              [numpy_helper.from_array(W, "net.weight"), numpy_helper.from_array(b, "net.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((2, 3, side, side)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(),
                                         providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = run(model)
    rewritten = rewrites.convtranspose_as_conv(model)
    assert "ConvTranspose" not in {n.op_type for n in rewritten.graph.node}
    np.testing.assert_allclose(run(rewritten), want, atol=1e-4)


def test_the_shipped_dcgan_int8_version_runs_as_int8_kernels_only(tmp_path):
    """What its speed rests on: after ONNX Runtime's optimizations, every learned layer is an int8
    kernel and nothing moves float phases (no float DepthToSpace, Conv or ConvTranspose left)."""
    import onnxruntime as ort

    from tests.conftest import ROOT

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(ROOT / "model_repository/dcgan_shapes/2/model.onnx"), opts,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("QLinearConv") == 4 and ops.count("QGemm") == 1
    assert not {"Conv", "ConvTranspose", "DepthToSpace", "Gemm"} & set(ops)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1   # in once, out once
