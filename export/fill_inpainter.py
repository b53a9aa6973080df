"""A classical, untrained inpainter as an ONNX graph with the served inpainting contract: a
test model and the stand-in for the trained inpainter where none is in the repository.

    image UINT8 [batch, T, T, 3] + mask UINT8 [batch, T, T, 1] (>= 128 = hole)
        -> inpainted UINT8 [batch, T, T, 3]

Each hole pixel gets the normalized-convolution blur of the known pixels around it
(`box(x * known) / box(known)` over a `radius` window), or the mean of the image's known pixels
where no known pixel is that close; every other pixel is passed through. All sums are of
integers in float32 (exact below 2**24), so the answer does not depend on how requests were
batched: the same item gives the same bytes in any batch.

The output is named `inpainted`, as export/image.py names the trained inpainter's: ONNX forbids
a graph output named like an input, and Triton's native onnxruntime backend looks outputs up by
their graph names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_onnx(tile: int, radius: int = 4, convs: int = 0, width: int = 32, seed: int = 0):
    """The ONNX ModelProto for tiles of `tile` x `tile` pixels.

    `convs` > 0 adds a stack of that many 3x3 convolutions of `width` channels with seeded
    random weights, whose tanh (times 4 grey levels) is added to the fill: the compute of a
    small learned inpainter, for measuring throughput. With `convs` the answer is only as
    batch-independent as ONNX Runtime's convolutions.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = 2 * radius + 1
    consts = {
        "c255": np.array(255, np.float32), "c128": np.array(128, np.float32),
        "c1": np.array(1, np.float32), "c0": np.array(0, np.float32),
        "axes_hw": np.array([2, 3], np.int64),
    }
    nodes = [
        # (B, T, T, C) uint8 -> (B, C, T, T) float
        helper.make_node("Cast", ["image"], ["x_nhwc"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["x_nhwc"], ["x"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["mask"], ["m_nhwc"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["m_nhwc"], ["m"], perm=[0, 3, 1, 2]),
        helper.make_node("GreaterOrEqual", ["m", "c128"], ["hole_b"]),      # (B, 1, T, T)
        helper.make_node("Cast", ["hole_b"], ["hole"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["c1", "hole"], ["known"]),
        helper.make_node("Mul", ["x", "known"], ["xk"]),                     # (B, 3, T, T)
        # window sums (AveragePool * k*k keeps them integers)
        helper.make_node("AveragePool", ["xk"], ["xk_avg"], kernel_shape=[k, k],
                         pads=[radius] * 4, count_include_pad=1),
        helper.make_node("AveragePool", ["known"], ["k_avg"], kernel_shape=[k, k],
                         pads=[radius] * 4, count_include_pad=1),
        helper.make_node("Max", ["k_avg", "eps_small"], ["k_avg_safe"]),
        helper.make_node("Div", ["xk_avg", "k_avg_safe"], ["blur"]),
        # per-image mean of known pixels: (B, 3, 1, 1)
        helper.make_node("ReduceSum", ["xk", "axes_hw"], ["sum_xk"], keepdims=1),
        helper.make_node("ReduceSum", ["known", "axes_hw"], ["sum_k"], keepdims=1),
        helper.make_node("Max", ["sum_k", "c1"], ["sum_k_safe"]),
        helper.make_node("Div", ["sum_xk", "sum_k_safe"], ["mean"]),
        helper.make_node("Greater", ["k_avg", "c0"], ["near_known"]),
        helper.make_node("Where", ["near_known", "blur", "mean"], ["fill0"]),
        helper.make_node("Where", ["hole_b", "fill", "x"], ["y"]),
        helper.make_node("Round", ["y"], ["y_r"]),
        helper.make_node("Clip", ["y_r", "c0", "c255"], ["y_c"]),
        helper.make_node("Transpose", ["y_c"], ["y_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Cast", ["y_nhwc"], ["inpainted"], to=TensorProto.UINT8),
    ]
    consts["eps_small"] = np.array(1e-12, np.float32)
    if convs:
        rng = np.random.default_rng(seed)
        consts["inv255"], consts["c4"] = np.array(1 / 255, np.float32), np.array(4, np.float32)
        conv_nodes = [helper.make_node("Mul", ["x", "inv255"], ["h0"])]
        c_in = 3
        for i in range(convs):
            c_out = 3 if i == convs - 1 else width
            consts[f"w{i}"] = (rng.standard_normal((c_out, c_in, 3, 3))
                               * np.sqrt(2 / (9 * c_in))).astype(np.float32)
            consts[f"b{i}"] = np.zeros(c_out, np.float32)
            conv_nodes.append(helper.make_node("Conv", [f"h{i}", f"w{i}", f"b{i}"], [f"conv{i}"],
                                               kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            # (B, c_out, T, T)
            conv_nodes.append(helper.make_node("Relu" if i < convs - 1 else "Tanh", [f"conv{i}"],
                                               [f"h{i + 1}"]))
            c_in = c_out
        conv_nodes += [helper.make_node("Mul", [f"h{convs}", "c4"], ["texture"]),
                       helper.make_node("Add", ["fill0", "texture"], ["fill"])]
        at = next(i for i, n in enumerate(nodes) if n.output[0] == "fill0") + 1
        nodes[at:at] = conv_nodes
    else:
        nodes.insert(next(i for i, n in enumerate(nodes) if n.output[0] == "fill0") + 1,
                     helper.make_node("Identity", ["fill0"], ["fill"]))
    init = [numpy_helper.from_array(v, name) for name, v in consts.items()]
    graph = helper.make_graph(
        nodes, "fill_inpainter",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", tile, tile, 3]),
         helper.make_tensor_value_info("mask", TensorProto.UINT8, ["batch", tile, tile, 1])],
        [helper.make_tensor_value_info("inpainted", TensorProto.UINT8, ["batch", tile, tile, 3])],
        init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="ganforge.export.fill_inpainter")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def export_fill_inpainter(repository: str | Path, name: str = "fill_inpainter", tile: int = 64,
                          max_batch_size: int = 16, radius: int = 4,
                          intra_op_threads: int = 0, convs: int = 0) -> Path:
    """Write the model directory NAME (ONNX: image, mask -> inpainted) into `repository`.

    Returns the path of the ONNX file.
    """
    import onnx

    from ganforge.masks import MASK_VALUES
    from ganforge.serving import repository as repo

    repository = Path(repository)
    img = repo.tensor("image", "UINT8", [tile, tile, 3])
    msk = repo.tensor("mask", "UINT8", [tile, tile, 1])
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / "1" / "model.onnx"
    onnx.save(build_onnx(tile, radius, convs), onnx_path)
    out = repo.tensor("inpainted", "UINT8", [tile, tile, 3])
    repo.write_config(model_dir, repo.onnx_model_config(name, [img, msk], [out], max_batch_size,
                                                        intra_op_threads=intra_op_threads,
                                                        allowed_values={"mask": MASK_VALUES}))
    repo.write_manifest(model_dir, {"model": name, "kind": "fill_inpainter (untrained, test model)",
                                    "tile": tile, "radius": radius, "convs": convs})
    return onnx_path
