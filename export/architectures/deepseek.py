"""DeepSeek-V2 (`deepseek_v2`) and DeepSeek-V3 (`deepseek_v3`), as transformers 5.25 implements them.

Both have:
- Multi-head latent attention (edgemoe.export.mla): q from q_proj, or from the low-rank
  q_a_proj -> q_a_layernorm -> q_b_proj when q_lora_rank is set; kv_a_proj_with_mqa gives the
  latent c_kv [kv_lora_rank] and a shared rotary key k_pe [qk_rope_head_dim]. The layer graphs
  keep c_kv (after kv_a_layernorm) and k_pe in the cache, not expanded keys and values.
- RoPE on the rotary dims only, in interleaved pairs (DeepSeek-V2 always, DeepSeek-V3 unless
  rope_interleave is false), the default RoPE or YaRN. With YaRN the attention scale
  qk_head_dim ** -0.5 is multiplied by mscale(factor, mscale_all_dim) squared.
- Layers before first_k_dense_replace have a dense SwiGLU MLP (intermediate_size). The others
  have routed experts plus n_shared_experts shared experts, which run inside the layer graph
  as one SwiGLU MLP of width moe_intermediate_size * n_shared_experts.
- Routing weights times routed_scaling_factor.
- FP8 checkpoints (DeepSeek-V3's own: e4m3 weights with a float32 weight_scale_inv per block of
  weight_block_size) are dequantized to float32 at export; the bundle stores fp32 or fp16.
  DeepSeek's inference code also quantizes activations to FP8 (activation_scheme dynamic); the
  bundle computes with float32 activations instead.

They differ in the router:
- V2: softmax over all experts; topk_method "greedy" takes the top-k, "group_limited_greedy"
  first keeps the topk_group of n_group groups with the highest max probability.
  transformers 5.25 never renormalises V2's weights, whatever norm_topk_prob says.
- V3: sigmoid scores; e_score_correction_bias is added for choosing only; groups score the sum
  of their two best biased scores; the weights are the unbiased scores of the chosen experts,
  renormalised when norm_topk_prob. The bias goes into the manifest (router_bias), so the
  runtime and its predictors choose as the model does.
"""

from __future__ import annotations

import logging

import numpy as np

from edgemoe.export.architectures.base import Architecture, ArchConfig, UnsupportedConfigError
from edgemoe.export.checkpoint import CheckpointError
from edgemoe.export.mla import MlaDims, MlaWeights, deinterleave_rope_rows, mla_attention, mla_cache_tensors
from edgemoe.export.onnx_graph import GraphBuilder
from edgemoe.export.rope_scaling import RopeScaling, parse_rope_scaling

logger = logging.getLogger(__name__)

_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"


class DeepseekV2(Architecture):
    model_type = "deepseek_v2"
    names = {
        **Architecture.names,
        "q_a_proj": f"{_ATTN}.q_a_proj.weight",
        "q_a_proj_bias": f"{_ATTN}.q_a_proj.bias",
        "q_a_norm": f"{_ATTN}.q_a_layernorm.weight",
        "q_b_proj": f"{_ATTN}.q_b_proj.weight",
        "kv_a_proj": f"{_ATTN}.kv_a_proj_with_mqa.weight",
        "kv_a_proj_bias": f"{_ATTN}.kv_a_proj_with_mqa.bias",
        "kv_a_norm": f"{_ATTN}.kv_a_layernorm.weight",
        "kv_b_proj": f"{_ATTN}.kv_b_proj.weight",
        "router_bias": f"{_MLP}.gate.e_score_correction_bias",
        "shared_gate": f"{_MLP}.shared_experts.gate_proj.weight",
        "shared_up": f"{_MLP}.shared_experts.up_proj.weight",
        "shared_down": f"{_MLP}.shared_experts.down_proj.weight",
    }
    routing = "softmax_group_topk"
    scoring_func = "softmax"  # the router's scoring, as DeepSeek's own configs name it

    # Config

    def expert_counts(self, config: dict) -> tuple[int, int]:
        return int(config["n_routed_experts"]), int(config["moe_intermediate_size"])

    def moe_layer_flags(self, config: dict, num_layers: int) -> list[bool]:
        frequency = config.get("moe_layer_freq", 1)
        if frequency != 1:
            # DeepSeek's own modeling code makes only every moe_layer_freq-th layer an MoE layer;
            # transformers 5.25 ignores the field, so the two disagree.
            raise UnsupportedConfigError(
                f"moe_layer_freq {frequency} is not supported; only 1 (every layer from "
                "first_k_dense_replace on is an MoE layer), as transformers 5.25 computes it")
        first_moe = int(config.get("first_k_dense_replace") or 0)
        return [layer >= first_moe for layer in range(num_layers)]

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        self.rope_scaling = parse_rope_scaling(config, self.default_rope_theta)
        # The base class reads only the default RoPE; this family adds YaRN on top.
        plain_rope = {"rope_type": "default", "rope_theta": self.rope_scaling.rope_theta}
        arch = super().parse_config({**config, "rope_parameters": plain_rope, "rope_scaling": None},
                                    generation_config)
        self.fp8_block = self._fp8_block_size(config)
        self._reject_unsupported(config)

        try:
            self.q_lora_rank = config.get("q_lora_rank")
            self.dims = MlaDims(num_heads=arch.num_attention_heads,
                                qk_nope_head_dim=int(config["qk_nope_head_dim"]),
                                qk_rope_head_dim=int(config["qk_rope_head_dim"]),
                                v_head_dim=int(config["v_head_dim"]), kv_lora_rank=int(config["kv_lora_rank"]))
            shared = int(config.get("n_shared_experts") or 0)
            arch.shared_expert_intermediate_size = arch.expert_intermediate_size * shared or None
            if not all(arch.moe_layers):
                arch.dense_intermediate_size = int(config["intermediate_size"])
            routed_scaling_factor = float(config.get("routed_scaling_factor", 1.0))
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks the field {exc}, which {self.model_type} needs") from exc
        if self.dims.qk_rope_head_dim % 2:
            raise UnsupportedConfigError(f"qk_rope_head_dim {self.dims.qk_rope_head_dim} is odd; RoPE needs "
                                         "an even number of rotary dims")

        self.interleaved = self.rope_interleaved(config)
        if config.get("attention_bias"):
            arch.attention_bias = ("q_a_proj", "kv_a_proj", "o_proj")
        qk_head_dim = self.dims.qk_nope_head_dim + self.dims.qk_rope_head_dim
        arch.attention_multiplier = qk_head_dim ** -0.5 * self.rope_scaling.softmax_scale_factor

        # Informational only: the runtime sizes its cache from kv_cache.
        arch.head_dim, arch.num_key_value_heads = qk_head_dim, arch.num_attention_heads
        arch.kv_cache = mla_cache_tensors(self.dims)
        arch.routing = self.routing
        arch.routing_params = {**self.group_params(config, arch), "routed_scaling_factor": routed_scaling_factor}
        self._log_cache_size(arch)
        return arch

    def rope_interleaved(self, config: dict) -> bool:
        """Return whether RoPE rotates interleaved pairs (DeepSeek-V2 always does)."""
        return True

    def group_params(self, config: dict, arch: ArchConfig) -> dict:
        """Return n_group and topk_group of the router after checking them (V2: topk_method)."""
        method = config.get("topk_method") or "greedy"
        if method == "greedy":
            return {"n_group": 1, "topk_group": 1}
        if method != "group_limited_greedy":
            raise UnsupportedConfigError(f"topk_method {method!r} is not supported for {self.model_type}; "
                                         "supported: greedy, group_limited_greedy")
        return _check_groups(config, arch, group_size_min=1)

    def _fp8_block_size(self, config: dict) -> tuple[int, int] | None:
        """Return the [rows, columns] of one weight_scale_inv block of an FP8 checkpoint, or None."""
        quantization = config.get("quantization_config")
        if not quantization:
            return None
        method, fmt = quantization.get("quant_method"), quantization.get("fmt", "e4m3")
        block = quantization.get("weight_block_size")
        if method != "fp8" or fmt != "e4m3" or not (isinstance(block, list) and len(block) == 2
                                                     and all(isinstance(b, int) and b > 0 for b in block)):
            raise UnsupportedConfigError(
                f"quantization_config with quant_method {method!r}, fmt {fmt!r}, weight_block_size {block!r} is not "
                "supported; edgemoe reads float checkpoints and FP8 e4m3 ones with 2-D block scales "
                "(quant_method fp8, weight_block_size [rows, columns]); dequantize others first")
        return block[0], block[1]

    def _reject_unsupported(self, config: dict) -> None:
        if config.get("mlp_bias"):
            raise UnsupportedConfigError("mlp_bias true is not supported; only MLPs without biases")
        heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        if kv_heads != heads:
            raise UnsupportedConfigError(
                f"num_key_value_heads {kv_heads} differs from num_attention_heads {heads}; multi-head latent "
                "attention expands the latent into one key and value per head, so they must be equal")
        scoring = config.get("scoring_func", self.scoring_func)
        if scoring != self.scoring_func:
            raise UnsupportedConfigError(f"scoring_func {scoring!r} is not supported for {self.model_type}; "
                                         f"only {self.scoring_func!r}")
        if self.model_type == "deepseek_v2" and config.get("norm_topk_prob"):
            raise UnsupportedConfigError(
                "norm_topk_prob true is not supported for deepseek_v2: transformers 5.25 ignores it and DeepSeek's "
                "own code renormalises, so the intended weights are ambiguous; set it to false")

    def _log_cache_size(self, arch: ArchConfig) -> None:
        d = self.dims
        compressed = 4 * (d.kv_lora_rank + d.qk_rope_head_dim) * arch.num_hidden_layers
        expanded = 4 * d.num_heads * (d.qk_nope_head_dim + d.qk_rope_head_dim + d.v_head_dim) * arch.num_hidden_layers
        logger.info("KV cache: %d bytes per token (c_kv and k_pe, float32) instead of %d for expanded keys "
                    "and values (%.1fx less)", compressed, expanded, expanded / compressed)

    # Weights

    def tensor(self, role: str, layer: int | None = None, expert: int | None = None) -> np.ndarray:
        """Return a tensor as float32; FP8 weights are multiplied by their weight_scale_inv blocks."""
        name = self.names[role].format(layer=layer, expert=expert)
        if self.checkpoint.dtype(name) != "F8_E4M3":
            return self.checkpoint.get(name)
        if self.fp8_block is None or not self.checkpoint.has(f"{name}_scale_inv"):
            raise CheckpointError(f"tensor {name} is FP8 (F8_E4M3) but {name}_scale_inv or config.json's "
                                  "quantization_config is missing, so its scale is unknown")
        array = self.checkpoint.get_e4m3(name)                                      # [O, I]
        scales = self.checkpoint.get(f"{name}_scale_inv")                          # [ceil(O/b0), ceil(I/b1)]
        rows, columns = self.fp8_block
        expected = (-(-array.shape[0] // rows), -(-array.shape[1] // columns))
        if scales.shape != expected:
            raise CheckpointError(f"tensor {name}_scale_inv has shape {list(scales.shape)}, expected {list(expected)} "
                                  f"for {name} {list(array.shape)} in blocks of {[rows, columns]} (weight_block_size)")
        full = np.repeat(np.repeat(scales, rows, axis=0), columns, axis=1)         # [>=O, >=I]
        return array * full[:array.shape[0], :array.shape[1]]

    def layer_roles(self, layer: int) -> list[str]:
        roles = ["input_norm", "post_attention_norm", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj"]
        roles += ["q_a_proj", "q_a_norm", "q_b_proj"] if self.q_lora_rank else ["q_proj"]
        roles += [f"{projection}_bias" for projection in self.config.attention_bias
                  if projection != "q_a_proj" or self.q_lora_rank]
        if not self.config.moe_layers[layer]:
            return roles + ["mlp_gate", "mlp_up", "mlp_down"]
        roles.append("router")
        if self.config.shared_expert_intermediate_size:
            roles += ["shared_gate", "shared_up", "shared_down"]
        return roles

    def optional_tensor(self, role: str, layer: int) -> np.ndarray | None:
        """Return the bias tensor of `role` when the config gives that projection one."""
        return self.tensor(f"{role}_bias", layer) if role in self.config.attention_bias else None

    # Graphs

    def attention(self, g: GraphBuilder, x: str, position_ids: str, past_c_kv: str, past_k_pe: str,
                  layer: int) -> tuple[str, str, str]:
        low_rank = bool(self.q_lora_rank)
        weights = MlaWeights(
            q=self.tensor("q_b_proj" if low_rank else "q_proj", layer),
            kv_a=self.tensor("kv_a_proj", layer), kv_a_norm=self.tensor("kv_a_norm", layer),
            kv_b=self.tensor("kv_b_proj", layer), o=self.tensor("o_proj", layer),
            q_a=self.tensor("q_a_proj", layer) if low_rank else None,
            q_a_norm=self.tensor("q_a_norm", layer) if low_rank else None,
            q_a_bias=self.optional_tensor("q_a_proj", layer) if low_rank else None,
            kv_a_bias=self.optional_tensor("kv_a_proj", layer), o_bias=self.optional_tensor("o_proj", layer))
        self._check_attention_shapes(weights, layer)
        if self.interleaved:
            weights = deinterleave_rope_rows(weights, self.dims)
        return mla_attention(g, x, position_ids, past_c_kv, past_k_pe, weights, self.dims, self.rope_scaling,
                             self.config.attention_multiplier, f"/layers.{layer}/attn", project=self.dense_linear)

    def _check_attention_shapes(self, weights: MlaWeights, layer: int) -> None:
        d, hidden = self.dims, self.config.hidden_size
        q_in = self.q_lora_rank or hidden
        expected = {"q_b_proj" if self.q_lora_rank else "q_proj":
                    (weights.q, (d.num_heads * (d.qk_nope_head_dim + d.qk_rope_head_dim), q_in)),
                    "kv_a_proj": (weights.kv_a, (d.kv_lora_rank + d.qk_rope_head_dim, hidden)),
                    "kv_b_proj": (weights.kv_b, (d.num_heads * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank)),
                    "o_proj": (weights.o, (hidden, d.num_heads * d.v_head_dim))}
        for role, (array, shape) in expected.items():
            if array.shape != shape:
                raise CheckpointError(
                    f"tensor {self.names[role].format(layer=layer)} has shape {list(array.shape)}, expected "
                    f"{list(shape)} from config.json (num_attention_heads, q_lora_rank, kv_lora_rank, "
                    "qk_nope_head_dim, qk_rope_head_dim, v_head_dim); the checkpoint does not match its config")

    def dense_mlp(self, g: GraphBuilder, x: str, layer: int) -> str | None:
        if not self.config.moe_layers[layer]:
            return super().dense_mlp(g, x, layer)
        if not self.config.shared_expert_intermediate_size:
            return None
        gate, up, down = (self.tensor(role, layer) for role in ("shared_gate", "shared_up", "shared_down"))
        return self.dense_swiglu(g, x, gate, up, down, f"/layers.{layer}/shared_experts")  # [T, H]


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"
    routing = "sigmoid_group_topk"
    scoring_func = "sigmoid"

    def rope_interleaved(self, config: dict) -> bool:
        return bool(config.get("rope_interleave", True))

    def group_params(self, config: dict, arch: ArchConfig) -> dict:
        method = config.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            raise UnsupportedConfigError(f"topk_method {method!r} is not supported for deepseek_v3; only noaux_tc "
                                         "(sigmoid scores with e_score_correction_bias), which transformers 5.25 runs")
        return _check_groups(config, arch, group_size_min=2)

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        arch.extra["router_bias"] = [self._router_bias(layer, arch.num_experts) if moe else None
                                     for layer, moe in enumerate(arch.moe_layers)]
        return arch

    def _router_bias(self, layer: int, experts: int) -> list[float]:
        """Return one layer's e_score_correction_bias as floats that round-trip through JSON."""
        bias = self.tensor("router_bias", layer)
        if bias.shape != (experts,):
            raise CheckpointError(f"tensor {self.names['router_bias'].format(layer=layer)} has shape "
                                  f"{list(bias.shape)}, expected [{experts}] (n_routed_experts)")
        return [float(v) for v in bias.astype(np.float32)]

    def layer_roles(self, layer: int) -> list[str]:
        roles = super().layer_roles(layer)
        return roles + ["router_bias"] if self.config.moe_layers[layer] else roles


def _check_groups(config: dict, arch: ArchConfig, group_size_min: int) -> dict:
    """Return {"n_group", "topk_group"} after checking that the groups split the experts and
    hold at least top-k of them."""
    n_group, topk_group = config.get("n_group"), config.get("topk_group")
    experts, top_k = arch.num_experts, arch.num_experts_per_tok
    if not n_group or experts % int(n_group) or experts // int(n_group) < group_size_min:
        raise UnsupportedConfigError(
            f"n_group {n_group!r} is invalid for {experts} routed experts: it must divide n_routed_experts into "
            f"groups of at least {group_size_min} experts")
    n_group = int(n_group)
    if not topk_group or not 1 <= int(topk_group) <= n_group or int(topk_group) * (experts // n_group) < top_k:
        raise UnsupportedConfigError(
            f"topk_group {topk_group!r} is invalid: it must be 1..{n_group} (n_group) and its groups must hold at "
            f"least num_experts_per_tok {top_k} experts")
    return {"n_group": n_group, "topk_group": int(topk_group)}
