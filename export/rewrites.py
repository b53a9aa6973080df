"""Exact rewrites of exported ONNX graphs, which reduced-precision export (quantize.py) runs
before converting: each gives the same sums in a form ONNX Runtime's int8 or low-precision
kernels run fast.

    convtranspose_as_conv        a ConvTranspose as a Conv of s*s phases, a DepthToSpace and a
                                 crop (a 1x1 input as a Gemm): ORT has int8 Conv, not ConvTranspose
    sink_depth_to_space          the activation after a learned layer moved ahead of the moves,
                                 so it fuses into the int8 conv
    depth_to_space_channels_last the DepthToSpace written channels-last, where ORT's int8 convs run
    fold_weight_scales           a weight scaled inside the graph (ProGAN's equalized learning
                                 rate) folded into a stored weight
    to_low_precision             the float region in float16 / bfloat16, Casts at its borders
    float_region                 the nodes whose precision changes
"""

from __future__ import annotations

import numpy as np

LEARNED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATIONS = ("Relu", "LeakyRelu", "Elu", "Tanh", "Sigmoid")


def producer_of(graph) -> dict[str, object]:
    return {o: n for n in graph.node for o in n.output}


def float_region(model) -> list[str]:
    """Names of the nodes whose precision changes: learned layers (weight a trained initializer,
    named after a module parameter) and activations fed by the region, in graph order."""
    inits = {i.name for i in model.graph.initializer}
    producers = producer_of(model.graph)
    region: list[str] = []
    for n in model.graph.node:
        if n.op_type in LEARNED_OPS and len(n.input) > 1 and n.input[1] in inits and "weight" in n.input[1]:
            region.append(n.name)
        elif n.op_type in ACTIVATIONS and n.input and getattr(producers.get(n.input[0]), "name", None) in region:
            region.append(n.name)
    return region


def convtranspose_as_conv(model):
    """Rewrite each ConvTranspose with a trained weight, group 1, dilation 1, equal strides s
    and (kernel - 2 pad) divisible by s as a Conv producing s*s phases per channel followed by
    DepthToSpace: output pixel s*q + r of the transposed conv is a correlation of the input
    around q with the kernel taps k = (r + p) mod s + s*j. Same sums, in another order.

    When s divides the kernel, every phase has K/s taps per side and its window starts at one
    of two neighbouring offsets: the Conv then has a (K/s)x(K/s) kernel on a grid one step
    larger, phases whose window starts one step later read it one step on, and a Slice crops
    the interleaved result by p mod s pixels at the start (for K=4, s=2, p=1: 2x2 taps, where
    one window covering every phase takes 3x3 of which each phase uses 4: 4/9 of the work)."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shapes = _static_shapes(model)
    nodes = []
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ok = (n.op_type == "ConvTranspose" and len(n.input) > 1 and n.input[1] in inits
              and attrs.get("group", 1) == 1 and set(attrs.get("dilations", [1])) == {1}
              and not attrs.get("output_shape") and not any(attrs.get("output_padding", []))
              and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))
        if ok:
            W = numpy_helper.to_array(inits[n.input[1]])                   # (Cin, Cout, K, K)
            strides = attrs.get("strides", [1, 1])
            pads = attrs.get("pads", [0, 0, 0, 0])
            K = W.shape[2]
            ok = (W.ndim == 4 and W.shape[2] == W.shape[3] and len(set(strides)) == 1
                  and len(set(pads)) == 1 and (K - 2 * pads[0]) % strides[0] == 0
                  and list(attrs.get("kernel_shape", [K, K])) == [K, K])
        if not ok:
            nodes.append(n)
            continue
        s, p = strides[0], pads[0]
        cin, cout = W.shape[:2]
        if shapes.get(n.input[0], [None] * 4)[2:] == [1, 1]:
            nodes += _one_pixel_as_gemm(g, n, W, p, inits)
            continue
        grid = _phase_grid(K, s, p)
        if grid is None:   # one window covering every phase's taps
            phases = [((r + p) % s, (r + p) // s, -(-(K - (r + p) % s) // s)) for r in range(s)]
            dmin = min(c - J + 1 for _, c, J in phases)
            L = max(c for _, c, _ in phases) - dmin + 1
            pad_begin, pad_end, crop = -dmin, L - 1 + dmin + (K - 2 * p - s) // s, (0, 0)
            taps = {r: (r, [(k + s * j, c - j - dmin) for j in range(J)]) for r, (k, c, J) in enumerate(phases)}
        else:
            L, pad_begin, pad_end, crop, taps = grid
        # per phase r: (its place among the Conv's phase channels, [(kernel tap, window position)])
        Wc = np.zeros((s, s, cout, cin, L, L), np.float32)              # (rh, rw, Cout, Cin, L, L)
        for rh in range(s):
            for rw in range(s):
                (ph, th), (pw, tw) = taps[rh], taps[rw]
                for kh, uh in th:
                    for kw, uw in tw:
                        Wc[ph, pw, :, :, uh, uw] = W[:, :, kh, kw].T
        wname = n.input[1] + "_as_conv"
        g.initializer.append(numpy_helper.from_array(Wc.reshape(cout * s * s, cin, L, L), wname))
        inputs = [n.input[0], wname]
        if len(n.input) > 2 and n.input[2]:
            b = numpy_helper.to_array(inits[n.input[2]])
            g.initializer.append(numpy_helper.from_array(np.tile(b, s * s).astype(np.float32),
                                                         n.input[2] + "_as_conv"))
            inputs.append(n.input[2] + "_as_conv")
        out = n.output[0]
        steps = (["phases"] if s > 1 else []) + (["uncropped"] if any(crop) else [])
        names = [f"{out}_{step}" for step in steps] + [out]
        nodes.append(helper.make_node("Conv", inputs, [names[0]], name=n.name + "_as_conv",
                                      kernel_shape=[L, L],
                                      pads=[pad_begin, pad_begin, pad_end, pad_end]))
        if s > 1:   # (B, s*s*Cout, T, T) -> (B, Cout, T*s, T*s), channel (rh*s + rw)*Cout + c
            nodes.append(helper.make_node("DepthToSpace", [names[0]], [names[1]],
                                          name=n.name + "_depth_to_space", blocksize=s, mode="DCR"))
        if any(crop):
            lo, hi = crop
            for k, v in ((f"{out}_crop_starts", [lo, lo]), (f"{out}_crop_ends", [-hi if hi else 2 ** 62] * 2),
                         (f"{out}_crop_axes", [2, 3])):
                g.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
            nodes.append(helper.make_node("Slice", [names[-2], f"{out}_crop_starts", f"{out}_crop_ends",
                                                    f"{out}_crop_axes"], [out], name=n.name + "_crop"))
    _set_nodes(g, nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


def _static_shapes(model) -> dict[str, list]:
    """Each inferred tensor's dims (None where not static)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.value_info, *inferred.input)}


def _one_pixel_as_gemm(g, n, W: np.ndarray, p: int, inits: dict) -> list:
    """A ConvTranspose of a 1x1 input (a generator's first layer, latent -> 4x4) as the matrix
    product it is: (B, Cin) x (Cin, Cout*Ho*Wo), each output pixel one kernel tap. As a Conv it
    would pad the one pixel to the kernel's size and multiply mostly zeros."""
    from onnx import helper, numpy_helper

    cin, cout, K = W.shape[0], W.shape[1], W.shape[2]
    side = K - 2 * p
    out = n.output[0]
    wname, shape_in, shape_out = n.input[1] + "_as_gemm", f"{out}_flat_shape", f"{out}_unflatten_shape"
    g.initializer.extend([
        # (Cin, Cout, side, side) taps -> (Cin, Cout*side*side): output column (c, y, x)
        numpy_helper.from_array(np.ascontiguousarray(W[:, :, p:K - p, p:K - p]).reshape(cin, -1), wname),
        numpy_helper.from_array(np.array([0, -1], np.int64), shape_in),
        numpy_helper.from_array(np.array([0, cout, side, side], np.int64), shape_out)])
    inputs = [f"{out}_flat", wname]
    if len(n.input) > 2 and n.input[2]:
        b = numpy_helper.to_array(inits[n.input[2]])
        g.initializer.append(numpy_helper.from_array(np.repeat(b, side * side).astype(np.float32),
                                                     n.input[2] + "_as_gemm"))
        inputs.append(n.input[2] + "_as_gemm")
    return [helper.make_node("Reshape", [n.input[0], shape_in], [f"{out}_flat"], name=n.name + "_flatten"),
            helper.make_node("Gemm", inputs, [f"{out}_pixels"], name=n.name + "_as_gemm"),
            helper.make_node("Reshape", [f"{out}_pixels", shape_out], [out], name=n.name + "_unflatten")]


def fold_weight_scales(model):
    """Fold a constant scale applied to a trained weight inside the graph (ProGAN's equalized
    learning rate: `Mul(weight, c)` before each Conv / Gemm) into the weight, so the layer is
    recognised as learned. The product is the one the graph computed, in float32."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    folded: dict[str, str] = {}
    nodes = []
    for n in g.node:
        if (n.op_type == "Mul" and len(n.input) == 2 and all(i in inits for i in n.input)
                and "weight" in n.input[0] and numpy_helper.to_array(inits[n.input[1]]).size == 1):
            name = f"{n.input[0]}_times_{n.input[1]}"
            if name not in folded.values():
                w = numpy_helper.to_array(inits[n.input[0]])
                scaled = (w * numpy_helper.to_array(inits[n.input[1]])).astype(w.dtype)
                g.initializer.append(numpy_helper.from_array(scaled, name))
            folded[n.output[0]] = name
            continue
        nodes.append(n)
    if not folded:
        return model
    for n in nodes:
        for k, i in enumerate(n.input):
            if i in folded:
                n.input[k] = folded[i]
    _set_nodes(g, nodes)
    onnx.checker.check_model(model)
    return model


def _phase_grid(K: int, s: int, p: int):
    """The compact phase layout of a transposed conv (kernel K, stride s, pad p), or None where
    it does not apply: (window L, pad begin, pad end, (crop start, crop end), taps per phase).

    Phase r reads input offsets c_r - j, j < J = K/s, with c_r = (r + p) // s, which is c0 or
    c0 + 1 (from r0 = s - p mod s on). On a grid t where phase r sits at t = q + (r >= r0),
    every phase reads the window t + c0 - J + 1 .. t + c0; interleaving the phases in the order
    r0, .., s-1, 0, .., r0-1 puts output pixel m at m + p mod s."""
    if K % s:
        return None
    J, c0 = K // s, p // s
    shift = p % s
    r0 = s - shift
    D = -(-(K - 2 * p - s + shift) // s)         # grid side minus input side
    pad_begin = J - 1 - c0
    pad_end = D - pad_begin + J - 1
    crop_end = s * D - (K - 2 * p - s) - shift
    if pad_begin < 0 or pad_end < 0 or crop_end < 0:
        return None
    taps = {}
    for r in range(s):
        # tap k + s*j reads offset c - j at grid t = q + (c - c0), window position J - 1 - j
        taps[r] = ((r - r0) % s, [((r + p) % s + s * j, J - 1 - j) for j in range(J)])
    return J, pad_begin, pad_end, (shift, crop_end), taps


# ops that act on each element alone (for Add / Mul / Sub / Div / Clip: with scalar constants),
# so they give the same values before and after a DepthToSpace, which only moves elements
ELEMENTWISE = ("Relu", "LeakyRelu", "Elu", "Tanh", "Sigmoid", "Round", "Cast", "Add", "Mul", "Sub", "Div", "Clip")


# the pure moves convtranspose_as_conv writes after a learned layer
MOVERS = ("_depth_to_space", "_crop", "_unflatten")


def sink_depth_to_space(model):
    """Move each DepthToSpace, Slice and Reshape that convtranspose_as_conv wrote past the
    elementwise ops that follow it (the same values, only moved or cropped), so that a Conv or
    Gemm is followed by its activation directly.

    With the rewritten ConvTranspose as Conv -> DepthToSpace -> Relu, the quantizer puts the
    Conv's output in uint8 at its pre-activation range (half of the levels spent on negatives
    the Relu then drops) and ONNX Runtime moves the float tensor through DepthToSpace. As
    Conv -> Relu -> DepthToSpace, the Relu fuses into the int8 conv, its output is quantized at
    the Relu's range, and DepthToSpace moves uint8 between two Q/DQ pairs of equal parameters,
    which ONNX Runtime drops. A generator's last DepthToSpace goes past Tanh and the uint8
    conversion, onto uint8 pixels: a quarter of the bytes."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    # names read by Loop / If bodies keep their producers
    outputs = {o.name for o in g.output} | (_used_names(g) - {i for n in g.node for i in n.input})

    def scalar_const(name: str) -> bool:
        return not name or (name in inits and numpy_helper.to_array(inits[name]).size == 1)

    moved = True
    while moved:
        moved = False
        nodes = list(g.node)
        consumers: dict[str, list[int]] = {}
        for j, n in enumerate(nodes):
            for i in n.input:
                consumers.setdefault(i, []).append(j)
        for k, d2s in enumerate(nodes):
            users = consumers.get(d2s.output[0], []) if d2s.name.endswith(MOVERS) else []
            if d2s.output[0] in outputs or len(users) != 1:
                continue
            j = users[0]
            op = nodes[j]
            if (op.op_type not in ELEMENTWISE or op.input[0] != d2s.output[0]
                    or not all(scalar_const(i) for i in op.input[1:])):
                continue
            # d2s: a -> b, op: b -> c   becomes   op: a -> c_phases, d2s: c_phases -> c
            a, c = d2s.input[0], op.output[0]
            op.input[0], op.output[0] = a, c + "_phases"
            d2s.input[0], d2s.output[0] = c + "_phases", c
            nodes.insert(k, nodes.pop(j))   # j > k: the op now runs first
            del g.node[:]
            g.node.extend(nodes)
            moved = True
            break
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


def depth_to_space_channels_last(model):
    """Write each DCR DepthToSpace of a 4-D tensor of known height and width as the same move
    done channels-last:

        Transpose to NHWC                  (B, H, W, s*s*C)
        Reshape                            (B, H, W, s, s, C)
        Transpose (0, 1, 3, 2, 4, 5)       (B, H, s, W, s, C)   blocks of s*C contiguous values
        Reshape                            (B, H*s, W*s, C)
        Transpose back to NCHW

    ONNX Runtime runs its int8 convs channels-last, between a Transpose to NCHW and one back:
    those cancel against the outer Transposes here, so what is left is one copy of s*C-value
    blocks, where its DepthToSpace kernel moves single values (a third of a generator's INT8
    time). Every value is kept; between Q/DQ pairs of one scale the moves run in uint8."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    shapes = _static_shapes(model)
    nodes = []
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        shape = shapes.get(n.input[0], [])
        if (n.op_type != "DepthToSpace" or attrs.get("mode", b"DCR") not in (b"DCR", "DCR")
                or len(shape) != 4 or None in shape[1:]):
            nodes.append(n)
            continue
        s, x, y, base = attrs["blocksize"], n.input[0], n.output[0], n.name or n.output[0]
        _, c, h, w = shape
        for name, value in ((f"{base}_split_shape", [0, h, w, s, s, c // (s * s)]),
                            (f"{base}_merged_shape", [0, h * s, w * s, c // (s * s)])):
            g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
        nodes += [helper.make_node("Transpose", [x], [f"{base}_nhwc"], name=f"{base}_to_nhwc", perm=[0, 2, 3, 1]),
                  helper.make_node("Reshape", [f"{base}_nhwc", f"{base}_split_shape"], [f"{base}_blocks"],
                                   name=f"{base}_split"),
                  helper.make_node("Transpose", [f"{base}_blocks"], [f"{base}_moved"], name=f"{base}_move",
                                   perm=[0, 1, 3, 2, 4, 5]),
                  helper.make_node("Reshape", [f"{base}_moved", f"{base}_merged_shape"], [f"{base}_merged"],
                                   name=f"{base}_merge"),
                  helper.make_node("Transpose", [f"{base}_merged"], [y], name=f"{base}_to_nchw",
                                   perm=[0, 3, 1, 2])]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


def _set_nodes(g, nodes: list) -> None:
    """Make `nodes` the graph's nodes and drop the initializers no node reads any more (an
    initializer that is a graph output stays)."""
    del g.node[:]
    g.node.extend(nodes)
    keep = _used_names(g) | {o.name for o in g.output}
    inits = [i for i in g.initializer if i.name in keep]
    del g.initializer[:]
    g.initializer.extend(inits)


def _used_names(graph) -> set[str]:
    """Every tensor name a node reads, in the graph and in its Loop / If bodies (which read
    the outer graph's initializers by name)."""
    import onnx

    used = set()
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g)
    return used


def _bf16_tensor(array: np.ndarray, name: str):
    from onnx import TensorProto

    u = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest even
    t = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(array.shape))
    t.raw_data = rounded.tobytes()
    return t


def to_low_precision(model, precision: str):
    """The float region of `model` in float16 or bfloat16; Casts at its borders keep every
    other node, and the graph's inputs and outputs, as they were."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    g = model.graph
    region = set(float_region(model))
    inits = {i.name: i for i in g.initializer}
    producers = producer_of(g)
    consumers_outside = {i for n in g.node if n.name not in region for i in n.input}
    consumers_outside |= {o.name for o in g.output}
    # outer-scope names used inside Loop / If bodies count as outside consumers
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                consumers_outside |= {i for sn in a.g.node for i in sn.input}
    low: dict[str, str] = {}
    nodes = []
    for n in g.node:
        if n.name not in region:
            nodes.append(n)
            continue
        for k, name in enumerate(n.input):
            if not name:
                continue
            if name not in low:
                src = producers.get(name)
                if name in inits:
                    a = numpy_helper.to_array(inits[name])
                    if a.dtype != np.float32:
                        continue
                    lname = f"{name}_{precision}"
                    g.initializer.append(numpy_helper.from_array(a.astype(np.float16), lname)
                                         if precision == "fp16" else _bf16_tensor(a, lname))
                elif src is not None and src.name in region:
                    continue   # renamed below when its producer was emitted
                else:
                    lname = f"{name}_{precision}"
                    nodes.append(helper.make_node("Cast", [name], [lname], name=f"cast_{lname}", to=elem))
                low[name] = lname
            n.input[k] = low[name]
        nodes.append(n)
        for k, name in enumerate(n.output):
            lname = f"{name}_{precision}"
            n.output[k] = lname
            low[name] = lname
            if name in consumers_outside:
                nodes.append(helper.make_node("Cast", [lname], [name], name=f"cast_{name}_fp32",
                                              to=TensorProto.FLOAT))
    _set_nodes(g, nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


def one_opset_entry(model):
    """A merged graph (the seeded generator) can list the default domain twice; the quantizer
    needs it once."""
    seen, keep = set(), []
    for op in model.opset_import:
        key = op.domain or "ai.onnx"
        if key not in seen:
            seen.add(key)
            keep.append((op.domain, max(o.version for o in model.opset_import if (o.domain or "ai.onnx") == key)))
    del model.opset_import[:]
    from onnx import helper

    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in keep)
    return model
