"""ONNX makers for the pieces MoE decoders share: RMSNorm, LayerNorm, linear, RoPE, GQA attention, SwiGLU.

Shape legend (batch is always 1 on the device, so it is dropped):
    T  tokens in this call          P  tokens already in the KV cache      S = P + T
    H  hidden size                  D  head dim                            E  experts
    N  attention heads              K  key/value heads                     G = N / K
    I  expert intermediate size
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgemoe.export.onnx_graph import MS_DOMAIN, GraphBuilder
from edgemoe.export.quantize import quantize


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, scope: str) -> str:
    """RMSNorm over the last axis, computed in float32 as transformers does.

        x ─┬─ Pow 2 ─ ReduceMean(-1) ─ Add eps ─ Sqrt ─┐
           └──────────────────────────────────────── Div ─ Mul weight
    """
    square = g.op("Pow", [x, g.const(f"{scope}/two", np.array(2.0, np.float32))], scope)
    axes = g.const(f"{scope}/axes", np.array([-1], np.int64))
    mean = g.op("ReduceMean", [square, axes], scope, keepdims=1)
    var = g.op("Add", [mean, g.const(f"{scope}/eps", np.array(eps, np.float32))], scope)
    normed = g.op("Div", [x, g.op("Sqrt", [var], scope)], scope)
    return g.op("Mul", [normed, g.weight(f"{scope}.weight", weight)], scope)


def layer_norm(g: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray, eps: float, scope: str) -> str:
    """LayerNorm over the last axis with a weight and a bias (the standard LayerNormalization op)."""
    return g.op("LayerNormalization", [x, g.weight(f"{scope}.weight", weight), g.weight(f"{scope}.bias", bias)],
                scope, axis=-1, epsilon=eps)


def linear(g: GraphBuilder, x: str, weight: np.ndarray, scope: str, bias: np.ndarray | None = None) -> str:
    """y = x @ weight.T (+ bias); `weight` in PyTorch's [out, in] layout, stored transposed."""
    y = g.op("MatMul", [x, g.weight(f"{scope}.weight", weight.T)], scope)
    if bias is not None:
        y = g.op("Add", [y, g.weight(f"{scope}.bias", bias)], scope)
    return y


def quantized_linear(g: GraphBuilder, x: str, weight: np.ndarray, scope: str, bits: int,
                     block_size: int, accuracy_level: int = 4) -> str:
    """y = x @ W'.T with W' the blocked `bits`-bit quantization of `weight` [out, in], as one
    MatMulNBits node.

    accuracy_level 4 lets onnxruntime quantize x to int8 per block and use integer dot products,
    which moves y by about 1 % of max|y|. Level 0 computes in float32 but hits a slow fallback
    for 8 bits, and onnxruntime 1.22 runs 8-bit MatMulNBits only at level 4.
    """
    qw = quantize(weight, bits, block_size)
    g.domains.add(MS_DOMAIN)
    packed = g.raw_weight(f"{scope}.weight_packed", qw.packed)
    scales = g.raw_weight(f"{scope}.weight_scales", qw.scales)
    inputs = [x, packed, scales]
    if qw.zero_points is not None:
        inputs.append(g.raw_weight(f"{scope}.weight_zero_points", qw.zero_points))
    return g.op("MatMulNBits", inputs, scope, domain=MS_DOMAIN, K=qw.k, N=qw.n, bits=bits,
                block_size=block_size, accuracy_level=accuracy_level)


def widened_copy(g: GraphBuilder) -> GraphBuilder:
    """Return a copy of graph `g` in which every 2-bit MatMulNBits runs as a 4-bit one.

    The copy has the same weights in the same order, so it can point into `g`'s data file. Its
    B and zero-point inputs are computed from the 2-bit ones by integer ops whose inputs are all
    initializers: onnxruntime's constant folding runs them once when the session is created, and
    the 4-bit kernel then prepacks the result. The file keeps 2-bit bytes and the kernel
    multiplies by the same values (edgemoe.export.quantize.widen_2bit is the numpy reference).
    For onnxruntime versions without a 2-bit kernel.
    """
    w = GraphBuilder(g.name, g.weight_dtype)
    w.inputs, w.outputs = list(g.inputs), list(g.outputs)
    w._weights, w._shared, w._constants = list(g._weights), list(g._shared), list(g._constants)
    w.domains, w.metadata, w._count = set(g.domains), dict(g.metadata), g._count
    for node in g.nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs.get("bits") != 2:
            w.nodes.append(node)
            continue
        x, packed, scales, zero_points = node.input
        n, block_size = attrs["N"], attrs["block_size"]
        blocks = -(-attrs["K"] // block_size)
        scope = f"/w{len(w.nodes)}"  # short names: the graph file is read with every expert load
        b4 = _repack_2bit_as_4bit(w, packed, n * blocks, block_size // 4, f"{scope}/widen_b")
        b4 = reshape(w, b4, [n, blocks, block_size // 2], scope)
        z4 = _repack_2bit_as_4bit(w, zero_points, n, -(-blocks // 4), f"{scope}/widen_z")
        z4 = w.op("Slice", [z4, w.const(f"{scope}/widen_z/start", np.array([0], np.int64)),
                            w.const(f"{scope}/widen_z/end", np.array([-(-blocks // 2)], np.int64)),
                            w.const(f"{scope}/widen_z/axis", np.array([1], np.int64))], scope)
        z4 = reshape(w, z4, [-1], scope)
        w.nodes.append(helper.make_node("MatMulNBits", [x, b4, scales, z4], list(node.output), name=node.name,
                                        domain=node.domain, **{**attrs, "bits": 4}))
    return w


def _repack_2bit_as_4bit(g: GraphBuilder, packed: str, rows: int, columns: int, scope: str) -> str:
    """uint8 [rows * columns] of 2-bit values, four per byte -> uint8 [rows, 2 * columns], two per byte."""
    def u8(name: str, value) -> str:
        return g.const(f"{scope}/{name}", np.array(value, np.uint8))

    grouped = reshape(g, packed, [rows, columns, 1], scope)
    values = g.op("BitShift", [grouped, u8("shifts", [0, 2, 4, 6])], scope, direction="RIGHT")
    values = g.op("BitwiseAnd", [values, u8("mask", 3)], scope)                       # [R, C, 4]
    pairs = reshape(g, values, [rows, 2 * columns, 2], scope)
    halves = g.const(f"{scope}/halves", np.array([1, 1], np.int64))
    low, high = g.op("Split", [pairs, halves], scope, num_outputs=2, axis=2)
    high = g.op("BitShift", [high, u8("four", 4)], scope, direction="LEFT")
    return reshape(g, g.op("BitwiseOr", [low, high], scope), [rows, 2 * columns], scope)


def reshape(g: GraphBuilder, x: str, shape: list[int], scope: str) -> str:
    return g.op("Reshape", [x, g.const(f"{scope}/shape_{g._count}", np.array(shape, np.int64))], scope)


def rope_tables(g: GraphBuilder, position_ids: str, head_dim: int, theta: float, scope: str,
                inv_freq: np.ndarray | None = None, factor: float = 1.0) -> tuple[str, str]:
    """cos and sin of RoPE, [T, D], as transformers builds them (float32).

    `inv_freq` [D/2] replaces the default RoPE's frequencies (YaRN, LongRoPE), and `factor`
    multiplies cos and sin (YaRN's attention factor, LongRoPE's mscale).
    """
    if inv_freq is None:
        inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)))
    positions = g.op("Cast", [position_ids], scope, to=TensorProto.FLOAT)                  # [T]
    positions = g.op("Unsqueeze", [positions, g.const(f"{scope}/axis1", np.array([1], np.int64))], scope)
    freqs = g.op("Mul", [positions, g.const(f"{scope}/inv_freq",
                                            np.asarray(inv_freq, np.float32)[None, :])], scope)  # [T, D/2]
    emb = g.op("Concat", [freqs, freqs], scope, axis=-1)                                 # [T, D]
    cos, sin = g.op("Cos", [emb], scope), g.op("Sin", [emb], scope)
    if factor != 1.0:
        scale = g.const(f"{scope}/factor", np.array(factor, np.float32))
        cos, sin = g.op("Mul", [cos, scale], scope), g.op("Mul", [sin, scale], scope)
    return cos, sin


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, scope: str) -> str:
    """x * cos + rotate_half(x) * sin, with x [heads, T, D] and rotate_half(a|b) = (-b|a)."""
    half = g.const(f"{scope}/split", np.array([head_dim // 2, head_dim // 2], np.int64))
    first, second = g.op("Split", [x, half], scope, num_outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [second], scope), first], scope, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], scope), g.op("Mul", [rotated, sin], scope)], scope)


def causal_attention(g: GraphBuilder, q: str, k: str, v: str, past_k: str, past_v: str,
                     num_heads: int, num_kv_heads: int, head_dim: int, scope: str,
                     scale: float | None = None, sliding_window: int | None = None,
                     sinks: np.ndarray | None = None) -> tuple[str, str, str]:
    """Grouped-query attention over the KV cache plus this call's tokens, causal.

    Args:
        q: [N, T, D] after RoPE; k, v: [K, T, D] (k after RoPE); past_k, past_v: [K, P, D].
        scale: factor on q·k before the softmax; None means head_dim ** -0.5.
        sliding_window: when given, query i sees only the keys j with P + i - j < sliding_window,
            itself included (transformers' sliding-window mask).
        sinks: [N] attention-sink logits (gpt-oss). Each joins its head's softmax denominator
            as one more logit, and its probability is dropped afterwards.

    Returns:
        The attention output [T, N*D] and the new cache tensors [K, S, D].
    """
    groups = num_heads // num_kv_heads
    all_k = g.op("Concat", [past_k, k], scope, axis=1)                                   # [K, S, D]
    all_v = g.op("Concat", [past_v, v], scope, axis=1)                                   # [K, S, D]

    # Query head n uses key/value head n // G, as transformers' repeat_kv lays them out.
    q4 = reshape(g, q, [num_kv_heads, groups, -1, head_dim], scope)                     # [K, G, T, D]
    k4 = g.op("Unsqueeze", [all_k, g.const(f"{scope}/axis1", np.array([1], np.int64))], scope)  # [K,1,S,D]
    v4 = g.op("Unsqueeze", [all_v, f"{scope}/axis1"], scope)                             # [K, 1, S, D]
    k4t = g.op("Transpose", [k4], scope, perm=[0, 1, 3, 2])                              # [K, 1, D, S]
    scores = g.op("MatMul", [q4, k4t], scope)                                            # [K, G, T, S]
    scale = head_dim ** -0.5 if scale is None else scale
    scores = g.op("Mul", [scores, g.const(f"{scope}/scale", np.array(scale, np.float32))], scope)

    # Causal mask: key j is visible to query i when j <= P + i.
    shape_k = g.op("Shape", [all_k], scope)
    total = g.op("Gather", [shape_k, g.const(f"{scope}/idx1", np.array(1, np.int64))], scope, axis=0)
    shape_q = g.op("Shape", [q], scope)
    new = g.op("Gather", [shape_q, f"{scope}/idx1"], scope, axis=0)
    past = g.op("Sub", [total, new], scope)
    zero = g.const(f"{scope}/zero", np.array(0, np.int64))
    one = g.const(f"{scope}/one", np.array(1, np.int64))
    key_pos = g.op("Range", [zero, total, one], scope)                                   # [S]
    query_pos = g.op("Range", [past, total, one], scope)                                 # [T]
    query_pos = g.op("Unsqueeze", [query_pos, f"{scope}/axis1"], scope)                  # [T, 1]
    visible = g.op("LessOrEqual", [key_pos, query_pos], scope)                           # [T, S]
    if sliding_window is not None:
        window = g.const(f"{scope}/sliding_window", np.array(sliding_window, np.int64))
        recent = g.op("Greater", [key_pos, g.op("Sub", [query_pos, window], scope)], scope)  # [T, S]
        visible = g.op("And", [visible, recent], scope)
    mask = g.op("Where", [visible, g.const(f"{scope}/open", np.array(0.0, np.float32)),
                          g.const(f"{scope}/closed", np.array(np.finfo(np.float32).min, np.float32))], scope)
    scores = g.op("Add", [scores, mask], scope)

    if sinks is None:
        probs = g.op("Softmax", [scores], scope, axis=-1)
    else:
        probs = _softmax_with_sinks(g, scores, sinks, num_kv_heads, groups, scope)      # [K, G, T, S]
    out = g.op("MatMul", [probs, v4], scope)                                             # [K, G, T, D]
    out = reshape(g, out, [num_heads, -1, head_dim], scope)                              # [N, T, D]
    out = g.op("Transpose", [out], scope, perm=[1, 0, 2])                                # [T, N, D]
    out = reshape(g, out, [0, num_heads * head_dim], scope)                              # [T, N*D]
    return out, all_k, all_v


def causal_mask(g: GraphBuilder, total: str, new: str, scope: str) -> str:
    """Additive mask [T, S] for `new` (T) queries that follow S - T cached tokens, with `total`
    (S) and `new` as int64 scalars: 0 where key j <= S - T + query i, float32 min elsewhere."""
    zero = g.const(f"{scope}/mask_zero", np.array(0, np.int64))
    one = g.const(f"{scope}/mask_one", np.array(1, np.int64))
    key_pos = g.op("Range", [zero, total, one], scope)                                   # [S]
    query_pos = g.op("Range", [g.op("Sub", [total, new], scope), total, one], scope)     # [T]
    query_pos = g.op("Unsqueeze", [query_pos, g.const(f"{scope}/mask_axis", np.array([1], np.int64))], scope)
    visible = g.op("LessOrEqual", [key_pos, query_pos], scope)                           # [T, S]
    return g.op("Where", [visible, g.const(f"{scope}/mask_open", np.array(0.0, np.float32)),
                          g.const(f"{scope}/mask_closed", np.array(np.finfo(np.float32).min, np.float32))], scope)


def _softmax_with_sinks(g: GraphBuilder, scores: str, sinks: np.ndarray, num_kv_heads: int, groups: int,
                        scope: str) -> str:
    """Softmax over [scores | sink] per row of scores [K, G, T, S], returned without the sink column."""
    sink = g.weight(f"{scope}.sinks", np.asarray(sinks).reshape(num_kv_heads, groups, 1, 1))  # [K, G, 1, 1]
    rows = g.op("Shape", [scores], scope, start=0, end=3)                                # [K, G, T]
    column_shape = g.op("Concat", [rows, g.const(f"{scope}/one_column", np.array([1], np.int64))], scope, axis=0)
    sink_column = g.op("Expand", [sink, column_shape], scope)                            # [K, G, T, 1]
    probs = g.op("Softmax", [g.op("Concat", [scores, sink_column], scope, axis=-1)], scope, axis=-1)  # [K,G,T,S+1]
    starts, ends, axes = (g.const(f"{scope}/sink_slice_{name}", np.array([value], np.int64))
                          for name, value in (("starts", 0), ("ends", -1), ("axes", -1)))
    return g.op("Slice", [probs, starts, ends, axes], scope)                             # [K, G, T, S]


def swiglu_expert(g: GraphBuilder, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                  scope: str) -> str:
    """down(silu(gate(x)) * up(x)) for x [T, H]; weights in PyTorch's [out, in] layout."""
    gate_out = linear(g, x, gate, f"{scope}/gate_proj")                                  # [T, I]
    up_out = linear(g, x, up, f"{scope}/up_proj")                                        # [T, I]
    silu = g.op("Mul", [gate_out, g.op("Sigmoid", [gate_out], scope)], scope)
    hidden = g.op("Mul", [silu, up_out], scope)                                          # [T, I]
    return linear(g, hidden, down, f"{scope}/down_proj")                                 # [T, H]


def quantized_swiglu_expert(g: GraphBuilder, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                            scope: str, bits: int, block_size: int, accuracy_level: int = 4) -> str:
    """swiglu_expert with its three projections quantized to `bits` (see quantized_linear)."""
    level = accuracy_level
    gate_out = quantized_linear(g, x, gate, f"{scope}/gate_proj", bits, block_size, level)  # [T, I]
    up_out = quantized_linear(g, x, up, f"{scope}/up_proj", bits, block_size, level)        # [T, I]
    silu = g.op("Mul", [gate_out, g.op("Sigmoid", [gate_out], scope)], scope)
    hidden = g.op("Mul", [silu, up_out], scope)                                          # [T, I]
    return quantized_linear(g, hidden, down, f"{scope}/down_proj", bits, block_size, level)  # [T, H]


def clamped_swiglu_expert(g: GraphBuilder, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                          biases: tuple[np.ndarray, np.ndarray, np.ndarray], alpha: float, limit: float,
                          scope: str, bits: int | None = None, block_size: int | None = None) -> str:
    """gpt-oss's expert for x [T, H]: projections with biases and a clamped SwiGLU.

        g = min(gate(x), limit)    u = clip(up(x), -limit, limit)
        y = down((u + 1) * g * sigmoid(alpha * g))

    Weights are in PyTorch's [out, in] layout; `biases` are those of gate, up and down. With
    `bits` the three projections are quantized as in quantized_linear and the biases stay float.
    """
    def project(value: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        if bits is None:
            return linear(g, value, weight, f"{scope}/{name}", bias)
        out = quantized_linear(g, value, weight, f"{scope}/{name}", bits, block_size)
        return g.op("Add", [out, g.weight(f"{scope}/{name}.bias", bias)], scope)

    gate_bias, up_bias, down_bias = biases
    gate_out = project(x, gate, gate_bias, "gate_proj")                                  # [T, I]
    up_out = project(x, up, up_bias, "up_proj")                                          # [T, I]
    high = g.const(f"{scope}/limit", np.array(limit, np.float32))
    low = g.const(f"{scope}/neg_limit", np.array(-limit, np.float32))
    gate_out = g.op("Min", [gate_out, high], scope)
    up_out = g.op("Clip", [up_out, low, high], scope)
    scaled = g.op("Mul", [gate_out, g.const(f"{scope}/alpha", np.array(alpha, np.float32))], scope)
    glu = g.op("Mul", [gate_out, g.op("Sigmoid", [scaled], scope)], scope)
    one = g.const(f"{scope}/one", np.array(1.0, np.float32))
    hidden = g.op("Mul", [g.op("Add", [up_out, one], scope), glu], scope)               # [T, I]
    return project(hidden, down, down_bias, "down_proj")                                 # [T, H]
