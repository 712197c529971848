"""Multi-head latent attention (MLA, DeepSeek-V2 and DeepSeek-V3) over a compressed cache.

Shape legend (batch 1): T tokens in this call, P cached tokens, S = P + T, H hidden size,
N heads, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim, R kv_lora_rank,
Rq q_lora_rank.

Per token and layer the cache stores the normalized latent c_kv [R] and the rotated shared key
k_pe [Dr], R + Dr floats, where expanded keys and values would take N * (Dn + Dr + Dv).
kv_b_proj, which expands c_kv into per-head k_nope and v, is folded into the query and the
output instead of being applied to all S cached tokens at every step:
    q_nope · (W_uk c) = (W_uk^T q_nope) · c        and        Σ p_j (W_uv c_j) = W_uv (Σ p_j c_j)
so attention works in the R-wide latent space and a decode step costs O(N * S * R).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgemoe.export.layers import apply_rope, causal_mask, linear, reshape, rms_norm, rope_tables
from edgemoe.export.onnx_graph import GraphBuilder
from edgemoe.export.rope_scaling import RopeScaling

# q_a_layernorm and kv_a_layernorm use RMSNorm's default epsilon in transformers 5.25, not
# the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@dataclass
class MlaDims:
    num_heads: int  # N
    qk_nope_head_dim: int  # Dn
    qk_rope_head_dim: int  # Dr
    v_head_dim: int  # Dv
    kv_lora_rank: int  # R


@dataclass
class MlaWeights:
    """One layer's attention weights in PyTorch's [out, in] layout."""

    q: np.ndarray  # q_b_proj [N*(Dn+Dr), Rq], or q_proj [N*(Dn+Dr), H] when q_lora_rank is null
    kv_a: np.ndarray  # kv_a_proj_with_mqa [R + Dr, H]
    kv_a_norm: np.ndarray  # kv_a_layernorm [R]
    kv_b: np.ndarray  # kv_b_proj [N*(Dn+Dv), R]
    o: np.ndarray  # o_proj [H, N*Dv]
    q_a: np.ndarray | None = None  # q_a_proj [Rq, H]
    q_a_norm: np.ndarray | None = None  # q_a_layernorm [Rq]
    q_a_bias: np.ndarray | None = None
    kv_a_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None


def deinterleave_rope_rows(weights: MlaWeights, dims: MlaDims) -> MlaWeights:
    """Reorder the rotary rows of q and kv_a from pairs (x0, x1), (x2, x3), ... to (x0, x2, ...,
    x1, x3, ...), so the half-split RoPE of apply_rope rotates the pairs that interleaved RoPE
    rotates.

    q_pe and k_pe come out in the same new order, which leaves every q_pe · k_pe unchanged.
    """
    rope = dims.qk_rope_head_dim
    order = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])       # [Dr]
    head = dims.qk_nope_head_dim + rope
    q_rows = np.arange(weights.q.shape[0]).reshape(dims.num_heads, head)          # [N, Dn+Dr]
    q_rows[:, dims.qk_nope_head_dim:] = q_rows[:, dims.qk_nope_head_dim:][:, order]
    kv_rows = np.arange(weights.kv_a.shape[0])                                    # [R+Dr]
    kv_rows[dims.kv_lora_rank:] = kv_rows[dims.kv_lora_rank:][order]
    bias = None if weights.kv_a_bias is None else weights.kv_a_bias[kv_rows]
    return MlaWeights(**{**weights.__dict__, "q": weights.q[q_rows.reshape(-1)],
                         "kv_a": weights.kv_a[kv_rows], "kv_a_bias": bias})


def mla_attention(g: GraphBuilder, x: str, position_ids: str, past_c_kv: str, past_k_pe: str,
                  weights: MlaWeights, dims: MlaDims, rope: RopeScaling, scale: float,
                  scope: str, project: Callable[..., str] = linear) -> tuple[str, str, str]:
    """Causal multi-head latent attention of x [T, H] after the cached tokens.

    Args:
        past_c_kv: [P, R] normalized latents; past_k_pe: [P, Dr] rotated shared keys.
        weights: with the rotary rows in half-split order (see deinterleave_rope_rows).
        scale: factor on q·k before the softmax.
        project: maker of the q, kv_a and o projections, called as linear is (g, x, weight,
            scope, bias); Architecture.dense_linear quantizes them. kv_b_proj is folded into
            batched per-head MatMuls, which MatMulNBits cannot take, so it stays float.

    Returns:
        The output [T, H] after o_proj, and the cache tensors c_kv [S, R] and k_pe [S, Dr].
    """
    n, nope, rot, dv, rank = (dims.num_heads, dims.qk_nope_head_dim, dims.qk_rope_head_dim,
                              dims.v_head_dim, dims.kv_lora_rank)
    if weights.q_a is None:
        q = project(g, x, weights.q, f"{scope}/q_proj")                                  # [T, N*(Dn+Dr)]
    else:
        q = project(g, x, weights.q_a, f"{scope}/q_a_proj", weights.q_a_bias)           # [T, Rq]
        q = rms_norm(g, q, weights.q_a_norm, LATENT_NORM_EPS, f"{scope}/q_a_layernorm")
        q = project(g, q, weights.q, f"{scope}/q_b_proj")                                # [T, N*(Dn+Dr)]
    q = g.op("Transpose", [reshape(g, q, [0, n, nope + rot], scope)], scope, perm=[1, 0, 2])  # [N, T, Dn+Dr]
    q_split = g.const(f"{scope}/q_split", np.array([nope, rot], np.int64))
    q_nope, q_pe = g.op("Split", [q, q_split], scope, num_outputs=2, axis=-1)           # [N,T,Dn], [N,T,Dr]

    kv = project(g, x, weights.kv_a, f"{scope}/kv_a_proj_with_mqa", weights.kv_a_bias)  # [T, R+Dr]
    kv_split = g.const(f"{scope}/kv_split", np.array([rank, rot], np.int64))
    c_kv, k_pe = g.op("Split", [kv, kv_split], scope, num_outputs=2, axis=-1)           # [T, R], [T, Dr]
    c_kv = rms_norm(g, c_kv, weights.kv_a_norm, LATENT_NORM_EPS, f"{scope}/kv_a_layernorm")

    cos, sin = rope_tables(g, position_ids, rot, rope.rope_theta, f"{scope}/rope",
                           inv_freq=rope.inv_freq(rot), factor=rope.cos_sin_factor)      # [T, Dr]
    q_pe = apply_rope(g, q_pe, cos, sin, rot, f"{scope}/rope_q")                        # [N, T, Dr]
    k_pe = apply_rope(g, k_pe, cos, sin, rot, f"{scope}/rope_k")                        # [T, Dr]
    all_c_kv = g.op("Concat", [past_c_kv, c_kv], scope, axis=0)                         # [S, R]
    all_k_pe = g.op("Concat", [past_k_pe, k_pe], scope, axis=0)                         # [S, Dr]

    # kv_b_proj [N*(Dn+Dv), R] holds per head the Dn rows of W_uk, then the Dv rows of W_uv.
    kv_b = weights.kv_b.reshape(n, nope + dv, rank)
    w_uk = g.weight(f"{scope}/kv_b_proj.k_weight", kv_b[:, :nope, :])                   # [N, Dn, R]
    w_uv = g.weight(f"{scope}/kv_b_proj.v_weight", kv_b[:, nope:, :].transpose(0, 2, 1))  # [N, R, Dv]
    q_latent = g.op("MatMul", [q_nope, w_uk], scope)                                    # [N, T, R]
    scores_nope = g.op("MatMul", [q_latent, g.op("Transpose", [all_c_kv], scope, perm=[1, 0])], scope)  # [N,T,S]
    scores_rope = g.op("MatMul", [q_pe, g.op("Transpose", [all_k_pe], scope, perm=[1, 0])], scope)     # [N,T,S]
    scores = g.op("Add", [scores_nope, scores_rope], scope)
    scores = g.op("Mul", [scores, g.const(f"{scope}/scale", np.array(scale, np.float32))], scope)

    index1 = g.const(f"{scope}/idx1", np.array(1, np.int64))
    total = g.op("Gather", [g.op("Shape", [all_c_kv], scope), g.const(f"{scope}/idx0", np.array(0, np.int64))],
                 scope, axis=0)                                                          # S
    new = g.op("Gather", [g.op("Shape", [q_pe], scope), index1], scope, axis=0)          # T
    scores = g.op("Add", [scores, causal_mask(g, total, new, scope)], scope)
    probs = g.op("Softmax", [scores], scope, axis=-1)                                   # [N, T, S]

    context = g.op("MatMul", [probs, all_c_kv], scope)                                  # [N, T, R]
    out = g.op("MatMul", [context, w_uv], scope)                                        # [N, T, Dv]
    out = g.op("Transpose", [out], scope, perm=[1, 0, 2])                               # [T, N, Dv]
    out = reshape(g, out, [0, n * dv], scope)                                           # [T, N*Dv]
    out = project(g, out, weights.o, f"{scope}/o_proj", weights.o_bias)                  # [T, H]
    return out, all_c_kv, all_k_pe


def mla_cache_tensors(dims: MlaDims) -> list[dict]:
    """Return the manifest's kv_cache entries of an MLA layer: c_kv [S, R] and k_pe [S, Dr]."""
    return [{"name": "c_kv", "shape": ["S", dims.kv_lora_rank]},
            {"name": "k_pe", "shape": ["S", dims.qk_rope_head_dim]}]

