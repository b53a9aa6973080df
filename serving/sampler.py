"""Seeded latents: (seed, index) -> latent (z_dim,), as numpy and as an ONNX graph.

Image `index` of `seed` has its own counter-based stream: the splitmix64 finaliser keyed by
(seed, index), element j of the latent from the stream's draws 2j and 2j + 1 through Box–Muller.
A latent depends only on (seed, index, z_dim), so "8 images for seed 42" starts with the 4 images
of "4 images for seed 42", and the dynamic batcher merging requests changes nothing.

The same arithmetic runs in two places: `latents` (numpy, in process) and `latent_graph` (ONNX
integer and float64 ops, served in front of the generator inside the NAME model, so generation
by seed is one batched ONNX Runtime call with no Python hop). The two agree to float32 rounding
(test: tests/serving/test_properties.py). Seeds and indices are 64-bit: the ONNX graph reads a
negative int64 as its two's complement, as numpy does; clients send seeds in [0, SEED_MAX].

numpy only at import; `latent_graph` imports onnx when called (export time).
"""

from __future__ import annotations

import numpy as np

SEED_MAX = 2**63 - 1
GOLDEN = 0x9E3779B97F4A7C15   # splitmix64's increment (2^64 / golden ratio)
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_U53 = 2.0 ** -53


def _counters(z_dim: int) -> np.ndarray:
    """(1, 2 z_dim) uint64: the stream offsets (k + 1) * GOLDEN, k = 0 .. 2 z_dim - 1, mod 2^64."""
    return np.array([[((k + 1) * GOLDEN) % 2**64 for k in range(2 * z_dim)]], dtype=np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def latents(seeds, indices, z_dim: int) -> np.ndarray:
    """(n, z_dim) float32 standard normals: row r is image `indices[r]` of `seeds[r]`."""
    s = np.asarray(seeds, dtype=np.int64).reshape(-1, 1).astype(np.uint64)
    i = np.asarray(indices, dtype=np.int64).reshape(-1, 1).astype(np.uint64)
    if s.shape != i.shape:
        raise ValueError(f"seeds and indices: {s.shape[0]} seeds but {i.shape[0]} indices; need one of each per row")
    with np.errstate(over="ignore"):   # uint64 arithmetic is meant to wrap
        key = _mix(_mix(s + np.uint64(GOLDEN)) + i + np.uint64(GOLDEN))
        bits = _mix(key + _counters(z_dim))
    u = ((bits >> np.uint64(11)).astype(np.float64) * _U53).reshape(-1, z_dim, 2)
    radius = np.sqrt(np.log(1.0 - u[..., 0]) * -2.0)       # 1 - u in (0, 1]: the log is finite
    return (radius * np.cos(u[..., 1] * (2 * np.pi))).astype(np.float32)


def sample_latents(seed: int, count: int, z_dim: int) -> np.ndarray:
    """(count, z_dim) float32: images 0 .. count - 1 of `seed`."""
    return latents(np.full(count, seed, dtype=np.int64), np.arange(count, dtype=np.int64), z_dim)


def latent_graph(z_dim: int, opset: int = 20, ir_version: int = 10):
    """The ONNX model of `latents`: `seed` INT64 [batch, 1], `index` INT64 [batch, 1] ->
    `latent` FLOAT [batch, z_dim]. Integer ops on uint64 wrap as numpy's do; Box–Muller in
    float64. Needs opset >= 18 (BitwiseXor)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits = [numpy_helper.from_array(np.array([GOLDEN], np.uint64), "golden"),
             numpy_helper.from_array(np.array([MIX1], np.uint64), "mix1"),
             numpy_helper.from_array(np.array([MIX2], np.uint64), "mix2"),
             numpy_helper.from_array(_counters(z_dim), "counters"),
             numpy_helper.from_array(np.array([-1, z_dim, 2], np.int64), "pairs_shape"),
             numpy_helper.from_array(np.array([-1, z_dim], np.int64), "latent_shape"),
             numpy_helper.from_array(np.array([1.0], np.float64), "one"),
             numpy_helper.from_array(np.array([-2.0], np.float64), "minus_two"),
             numpy_helper.from_array(np.array([2 * np.pi], np.float64), "two_pi"),
             numpy_helper.from_array(np.array([_U53], np.float64), "u53")]
    inits += [numpy_helper.from_array(np.array([n], np.uint64), f"shift{n}") for n in (11, 27, 30, 31)]

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def xorshift(z: str, n: int, tag: str) -> str:
        return node("BitwiseXor", [z, node("BitShift", [z, f"shift{n}"], f"{tag}_shr{n}", direction="RIGHT")],
                    f"{tag}_xor{n}")

    def mix(z: str, tag: str) -> str:
        z = node("Mul", [xorshift(z, 30, tag), "mix1"], f"{tag}_m1")
        z = node("Mul", [xorshift(z, 27, tag), "mix2"], f"{tag}_m2")
        return xorshift(z, 31, tag)

    s = node("Cast", ["seed"], "seed_u64", to=TensorProto.UINT64)
    i = node("Cast", ["index"], "index_u64", to=TensorProto.UINT64)
    k = mix(node("Add", [s, "golden"], "seed_plus_golden"), "seed")
    k = node("Add", [node("Add", [k, i], "key_plus_index"), "golden"], "key_in")
    key = mix(k, "key")
    bits = mix(node("Add", [key, "counters"], "stream"), "draw")
    u = node("Mul", [node("Cast", [node("BitShift", [bits, "shift11"], "top53", direction="RIGHT")],
                          "top53_f64", to=TensorProto.DOUBLE), "u53"], "uniform")
    pairs = node("Reshape", [u, "pairs_shape"], "uniform_pairs")
    nodes.append(helper.make_node("Split", [pairs], ["u_radius", "u_angle"], name="split_pairs",
                                  axis=2, num_outputs=2))
    radius = node("Sqrt", [node("Mul", [node("Log", [node("Sub", ["one", "u_radius"], "one_minus_u")], "log_u"),
                                        "minus_two"], "minus_two_log_u")], "radius")
    angle = node("Cos", [node("Mul", ["u_angle", "two_pi"], "angle")], "cos_angle")
    normal = node("Reshape", [node("Mul", [radius, angle], "normal_pairs"), "latent_shape"], "normal")
    node("Cast", [normal], "latent", to=TensorProto.FLOAT)

    graph = helper.make_graph(
        nodes, "seeded_latents",
        [helper.make_tensor_value_info("seed", TensorProto.INT64, ["batch", 1]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", z_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="ganforge.sampler")
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model
