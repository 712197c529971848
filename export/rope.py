"""RoPE variants beyond the default one: YaRN inverse frequencies and the cos/sin tables they feed.

YaRN (Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models", arXiv
2309.00071) blends two sets of inverse frequencies per rotary dimension pair: the original ones
(extrapolation) for the high-frequency pairs, the ones divided by `factor` (interpolation) for
the low-frequency pairs, and a linear ramp in between. cos and sin are then multiplied by an
attention factor, 0.1 * ln(factor) + 1 unless the config gives one.
The formulas follow transformers 5.25 (`_compute_yarn_parameters` in modeling_rope_utils.py),
computed in float32 as it does, so exported graphs match its logits.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from edgemoe.export.onnx_graph import GraphBuilder


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """Return the YaRN magnitude correction 0.1 * mscale * ln(factor) + 1 (1.0 for factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(rope_parameters: dict, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Return YaRN's inverse frequencies float32 [head_dim / 2] and its attention factor.

    Args:
        rope_parameters: the config's `rope_parameters` (or `rope_scaling`) dict, with `rope_theta`,
            `factor` (None: max_position_embeddings / original_max_position_embeddings),
            `original_max_position_embeddings`, and optionally `beta_fast` (default 32),
            `beta_slow` (default 1), `attention_factor`, `mscale`, `mscale_all_dim` and
            `truncate` (default True: round the ramp's ends to whole dimension pairs).
        head_dim: the rotated width; partial rotary is the caller's to reject or handle.
        max_position_embeddings: the config's context length.
    """
    base = float(rope_parameters["rope_theta"])
    original = int(rope_parameters["original_max_position_embeddings"])
    factor = rope_parameters.get("factor")
    factor = max_position_embeddings / original if factor is None else float(factor)

    attention_factor = rope_parameters.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rope_parameters.get("beta_fast") or 32
    beta_slow = rope_parameters.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp

    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    pos_freqs = np.float32(base) ** exponents                                          # [D/2]
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_share = np.float32(1.0) - ramp.astype(np.float32)
    inv_freq = interpolation * (np.float32(1.0) - extrapolation_share) + extrapolation * extrapolation_share
    return inv_freq.astype(np.float32), float(attention_factor)


def scaled_rope_tables(g: GraphBuilder, position_ids: str, inv_freq: np.ndarray, attention_factor: float,
                       scope: str) -> tuple[str, str]:
    """cos and sin [T, D] from given inverse frequencies [D/2], each times `attention_factor`.

    The layout matches `edgemoe.export.layers.rope_tables` (the D/2 frequencies repeated twice),
    so `apply_rope` uses the tables unchanged.
    """
    positions = g.op("Cast", [position_ids], scope, to=TensorProto.FLOAT)                   # [T]
    positions = g.op("Unsqueeze", [positions, g.const(f"{scope}/axis1", np.array([1], np.int64))], scope)
    freqs = g.op("Mul", [positions, g.const(f"{scope}/inv_freq",
                                            np.asarray(inv_freq, np.float32)[None, :])], scope)  # [T, D/2]
    emb = g.op("Concat", [freqs, freqs], scope, axis=-1)                                  # [T, D]
    cos, sin = g.op("Cos", [emb], scope), g.op("Sin", [emb], scope)
    if attention_factor != 1.0:
        factor = g.const(f"{scope}/attention_factor", np.array(attention_factor, np.float32))
        cos, sin = g.op("Mul", [cos, factor], scope), g.op("Mul", [sin, factor], scope)
    return cos, sin
