"""What a model could run at: its multiply-accumulates per image, counted from the ONNX graph,
and this machine's float32 matmul throughput through the kernels the models run on."""

from __future__ import annotations

import time

import numpy as np


def onnx_macs_per_image(path: str) -> int:
    """Multiply-accumulates of Conv / ConvTranspose / MatMul / Gemm for one image (batch 1)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(path)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = shapes.get(node.input[1])
            ref = shapes.get(node.output[0] if node.op_type == "Conv" else node.input[0])
            if not w or not ref or 0 in ref:
                continue
            # One formula for both, so groups drop out: a Conv's weight is (Cout, Cin/groups, k)
            # and each output element costs Cin/groups x k; a ConvTranspose's weight is
            # (Cin, Cout/groups, k) and each input element costs Cout/groups x k.
            macs += int(np.prod(ref)) * (w[1] * int(np.prod(w[2:])))
        elif node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a and b and 0 not in a and 0 not in b:
                macs += int(np.prod(a)) * b[-1]
    return macs


def matmul_flops(seconds: float = 2.0, n: int = 1024) -> float:
    """This machine's float32 matmul throughput (FLOP/s) through ONNX Runtime's own GEMM (MLAS,
    all cores): the kernels the models run on, which numpy's BLAS is not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    feed = {"a": a, "b": a.copy()}
    sess.run(None, feed)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, feed)
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)
