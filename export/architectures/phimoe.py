"""PhiMoE (`phimoe`, Phi-3.5-MoE): LayerNorms, biases everywhere, sparsemixer routing, LongRoPE.

Differences from Mixtral, as transformers 5.25 computes them at inference:
- The input, post-attention and final norms are LayerNorms with a weight and a bias
  (eps = `rms_norm_eps`). q/k/v/o have biases when `attention_bias` is set, and the LM head
  has one when `lm_head_bias` is set.
- The router is sparsemixer (edgemoe.runtime.routing.route_sparsemixer) with jitter_eps =
  `router_jitter_noise`. It always picks two experts, so num_experts_per_tok must be 2.
  `input_jitter_noise` only acts in training and is ignored.
- With rope_type "longrope", the RoPE frequencies are divided by `short_factor`, and cos and sin
  are multiplied by `short_mscale` while the highest position of a forward call is below
  `original_max_position_embeddings`. Past it, transformers 5.25 switches to `long_mscale` for
  every token of that call, so cached keys and new ones differ in scale, and the result depends
  on how the tokens are split into calls. It keeps `short_factor` there, although its generic
  LongRoPE update (`dynamic_rope_update`) prepares `long_factor` frequencies that
  PhimoeRotaryEmbedding.forward never reads. The export therefore caps the context at
  `original_max_position_embeddings`, where the short set is the only reading.
"""

from __future__ import annotations

import logging

import numpy as np

from edgemoe.export.architectures.base import Architecture, ArchConfig, UnsupportedConfigError
from edgemoe.export.layers import layer_norm, rope_tables
from edgemoe.export.onnx_graph import GraphBuilder

logger = logging.getLogger(__name__)


def _rope_parameters(config: dict) -> dict:
    # transformers 5.x saves rope_parameters; 4.x saved rope_scaling with a "type" key.
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


class Phimoe(Architecture):
    model_type = "phimoe"
    # PhimoeConfig's default rope_theta in transformers 5.25.
    default_rope_theta = 1e6
    names = {
        **Architecture.names,
        "final_norm_bias": "model.norm.bias",
        "input_norm_bias": "model.layers.{layer}.input_layernorm.bias",
        "post_attention_norm_bias": "model.layers.{layer}.post_attention_layernorm.bias",
        "router": "model.layers.{layer}.block_sparse_moe.gate.weight",
        "expert_gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "expert_up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        "expert_down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    }

    def expert_counts(self, config: dict) -> tuple[int, int]:
        return int(config["num_local_experts"]), int(config["intermediate_size"])

    def rope_theta(self, config: dict) -> float:
        params = _rope_parameters(config)
        rope_type = _rope_type(params)
        if rope_type not in ("default", "longrope"):
            raise UnsupportedConfigError(
                f"rope_type {rope_type!r} is not supported for phimoe; edgemoe exports rope_type default and longrope")
        if rope_type == "default":
            return super().rope_theta(config)
        return float(params.get("rope_theta", config.get("rope_theta", self.default_rope_theta)))

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        arch.rms_norm_eps = float(config.get("rms_norm_eps", 1e-5))
        if arch.num_experts_per_tok != 2:
            raise UnsupportedConfigError(
                f"num_experts_per_tok {arch.num_experts_per_tok} is not supported for phimoe: transformers' "
                "sparsemixer router always picks 2 experts, whatever this field says; set it to 2")
        if config.get("attention_bias"):
            arch.attention_bias = ("q_proj", "k_proj", "v_proj", "o_proj")
        arch.lm_head_bias = bool(config.get("lm_head_bias", False))
        arch.routing = "sparsemixer"
        arch.routing_params = {"jitter_eps": float(config.get("router_jitter_noise", 0.01))}

        params = _rope_parameters(config)
        if _rope_type(params) == "longrope":
            self.parse_longrope(config, params, arch)
        return arch

    def parse_longrope(self, config: dict, params: dict, arch: ArchConfig) -> None:
        """Store LongRoPE's short-context frequencies and cos/sin factor in `arch.extra` and cap the
        context at original_max_position_embeddings."""
        partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise UnsupportedConfigError(
                f"partial_rotary_factor {partial} is not supported for phimoe; only 1.0 (RoPE on the whole head)")
        half = arch.head_dim // 2
        factors = params.get("short_factor")
        if not isinstance(factors, list) or len(factors) != half:
            raise UnsupportedConfigError(
                f"rope short_factor {factors!r} is invalid: it must be a list of {half} numbers "
                f"(head_dim {arch.head_dim} / 2); fix config.json")
        mscale = params.get("short_mscale")
        if not isinstance(mscale, (int, float)):
            raise UnsupportedConfigError(
                f"rope short_mscale {mscale!r} is invalid: phimoe's longrope needs a number there; fix config.json")
        # transformers gives a top-level original_max_position_embeddings priority over the one in
        # the rope parameters, and falls back to max_position_embeddings.
        original = int(config.get("original_max_position_embeddings")
                       or params.get("original_max_position_embeddings")
                       or config.get("max_position_embeddings", arch.max_position_embeddings))

        # float32 throughout, as transformers computes inv_freq.
        exponents = np.arange(0, arch.head_dim, 2, dtype=np.int64).astype(np.float32) / arch.head_dim
        inv_freq = 1.0 / (np.asarray(factors, np.float32) * np.float32(arch.rope_theta) ** exponents)
        arch.extra["rope_inv_freq"] = inv_freq.astype(np.float32)                     # [D/2]
        arch.extra["rope_mscale"] = float(mscale)
        if arch.max_position_embeddings > original:
            logger.warning(
                "phimoe longrope: the context is capped at %d tokens (original_max_position_embeddings) "
                "instead of %d, because only short_factor and short_mscale are exported", original,
                arch.max_position_embeddings)
            arch.max_position_embeddings = original

    # Weights and graphs

    def layer_roles(self, layer: int) -> list[str]:
        return super().layer_roles(layer) + ["input_norm_bias", "post_attention_norm_bias"]

    def required_names(self) -> list[str]:
        return super().required_names() + [self.names["final_norm_bias"]]

    def norm(self, g: GraphBuilder, x: str, role: str, layer: int | None, scope: str) -> str:
        weight, bias = self.tensor(role, layer), self.tensor(f"{role}_bias", layer)
        return layer_norm(g, x, weight, bias, self.config.rms_norm_eps, scope)

    def rope_tables(self, g: GraphBuilder, position_ids: str, scope: str) -> tuple[str, str]:
        extra = self.config.extra
        if "rope_inv_freq" not in extra:
            return super().rope_tables(g, position_ids, scope)
        return rope_tables(g, position_ids, self.config.head_dim, self.config.rope_theta, scope,
                           inv_freq=extra["rope_inv_freq"], factor=extra["rope_mscale"])
