"""RoPE parameters from a Hugging Face config: the default RoPE and YaRN.

YaRN (Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models",
arXiv 2309.00071) stretches the rotation wavelengths by `factor` where a dimension turns
less than `beta_slow` times over the pretraining length (`original_max_position_embeddings`),
keeps those that turn more than `beta_fast` times, and ramps linearly in between. It also
multiplies cos and sin by an attention factor. The formulas follow transformers 5.25
(`_compute_yarn_parameters` and `yarn_apply_mscale` in modeling_rope_utils.py), in float32 as
transformers computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgemoe.export.architectures.base import UnsupportedConfigError

SUPPORTED_ROPE_TYPES = ("default", "yarn")


@dataclass
class RopeScaling:
    """One config's RoPE, with the Hugging Face field names of rope_parameters."""

    rope_type: str  # "default" or "yarn"
    rope_theta: float
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # an explicit cos/sin factor; None derives it from factor
    truncate: bool = True  # round the ramp's ends outwards to whole dimensions

    def inv_freq(self, dim: int) -> np.ndarray:
        """Return the inverse frequencies [dim / 2] of a rotary part `dim` wide, float32."""
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        pos_freqs = np.float32(self.rope_theta) ** exponents                          # [dim/2]
        extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
        if self.rope_type == "default":
            return extrapolation
        interpolation = (np.float32(1.0) / (np.float32(self.factor) * pos_freqs)).astype(np.float32)
        low, high = self._correction_range(dim)
        if low == high:
            high += 0.001  # keeps the ramp finite
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        kept = (np.float32(1.0) - ramp).astype(np.float32)                            # 1: keep the original
        return (interpolation * (1 - kept) + extrapolation * kept).astype(np.float32)

    def _correction_range(self, dim: int) -> tuple[float, float]:
        """Dimension indices where the ramp from keeping to stretching starts and ends."""
        def dimension_for(rotations: float) -> float:
            turns = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return dim * math.log(turns) / (2 * math.log(self.rope_theta))

        low, high = dimension_for(self.beta_fast), dimension_for(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    @property
    def cos_sin_factor(self) -> float:
        """Factor on cos and sin (YaRN's attention factor); 1 for the default RoPE."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)

    @property
    def softmax_scale_factor(self) -> float:
        """Factor on the attention scale of multi-head latent attention (DeepSeek), which applies
        YaRN's mscale to every dimension of q·k: mscale(factor, mscale_all_dim) squared."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude scale 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def parse_rope_scaling(config: dict, default_theta: float = 10000.0) -> RopeScaling:
    """Read the RoPE of a config.json: transformers 5.x `rope_parameters`, or 4.x `rope_scaling`
    and a top-level `rope_theta`.

    Raises:
        UnsupportedConfigError: a rope type other than default and yarn, a partial rotary
            factor, or invalid YaRN values; the message names the field and its value.
    """
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", config.get("rope_theta", default_theta)))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope_type {rope_type!r} is not supported; edgemoe exports {' and '.join(SUPPORTED_ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(f"partial_rotary_factor {partial} is not supported; only 1.0")
    if rope_type == "default":
        return RopeScaling("default", theta)

    # transformers prefers a top-level original_max_position_embeddings, then the rope one, then
    # max_position_embeddings.
    original = config.get("original_max_position_embeddings",
                          params.get("original_max_position_embeddings", config.get("max_position_embeddings")))
    if original is None or int(original) < 1:
        raise UnsupportedConfigError(f"YaRN original_max_position_embeddings {original!r} is invalid; "
                                     "set it to the pretraining context length in config.json")
    factor = params.get("factor")
    if factor is None:
        factor = float(config["max_position_embeddings"]) / int(original)
    if float(factor) <= 0:
        raise UnsupportedConfigError(f"YaRN factor {factor} is invalid; it must be above 0")
    return RopeScaling(
        "yarn", theta, factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))
