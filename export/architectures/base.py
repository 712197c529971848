"""What every supported MoE decoder shares: config reading, the tensor-name table, and the
graphs (embedding, one dense graph per layer, one graph per expert, final norm + LM head).

A family module subclasses `Architecture`, sets `model_type` and its name table, and overrides
only what differs (config fields, q/k norms, routing details, shared experts, fused experts).

Every dense linear weight (attention projections, shared experts, dense layers' MLPs, LM head)
goes through `dense_linear` or `dense_swiglu`, so `dense_bits` (`--dense-dtype int8`) reaches
every family. Routers, norms and other small tensors stay float.

Everything that runs for every token stays in the dense layer graph: attention, the router, a
dense layer's MLP and a shared expert. Only routed experts get their own graphs, so only they
count against the runtime's expert budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from onnx import TensorProto

from edgemoe.export.checkpoint import Checkpoint, CheckpointError
from edgemoe.export.layers import (apply_rope, causal_attention, linear, quantized_linear, reshape, rms_norm,
                                   quantized_swiglu_expert, rope_tables, swiglu_expert)
from edgemoe.export.onnx_graph import GraphBuilder
from edgemoe.runtime.manifest import EXPERT_BLOCK_SIZE_KEY, EXPERT_DTYPE_KEY, ModelConfig


class UnsupportedConfigError(Exception):
    """The checkpoint's config uses an option edgemoe does not export."""


@dataclass
class ArchConfig:
    """Config of a decoder-only MoE model, with Hugging Face field names; derived fields last."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    clip_qkv: float | None = None
    # Per layer: True for an MoE layer, False for a dense MLP layer. parse_config fills it in.
    moe_layers: list[bool] = field(default_factory=list)
    dense_intermediate_size: int | None = None  # MLP width of dense layers (qwen2_moe `intermediate_size`)
    shared_expert_intermediate_size: int | None = None
    attention_bias: tuple[str, ...] = ()  # projections with a bias, such as ("q_proj", "k_proj", "v_proj")
    attention_multiplier: float | None = None  # scale of q·k; None means head_dim ** -0.5
    embedding_multiplier: float = 1.0  # factor on the embedding output
    residual_multiplier: float = 1.0  # factor on the attention and MLP outputs before each residual add
    logits_scaling: float = 1.0  # the logits are divided by it
    routing: str = "softmax_topk"  # see edgemoe.runtime.routing.ROUTING_METHODS
    routing_params: dict | None = None  # keyword arguments of the routing method (ModelConfig)
    kv_cache: list[dict] | None = None  # per-layer cache tensors; None: key and value (ModelConfig)
    lm_head_bias: bool = False
    # extra["router_bias"]: per-layer e_score_correction_bias lists for the manifest. It lives
    # here, not in a field, so the bundle's record of the source config stays small.
    extra: dict = field(default_factory=dict)

    def runtime_config(self) -> ModelConfig:
        return ModelConfig(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok, norm_topk_prob=self.norm_topk_prob,
            vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id, eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id, moe_layers=list(self.moe_layers), routing=self.routing,
            residual_multiplier=self.residual_multiplier, kv_cache=self.kv_cache,
            routing_params=self.routing_params, router_bias=self.extra.get("router_bias"))


def _eos_ids(config: dict, generation_config: dict) -> list[int]:
    value = generation_config.get("eos_token_id", config.get("eos_token_id"))
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _rope_theta(config: dict, default: float, supported: tuple[str, ...] = ("default",)) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in supported:
        raise UnsupportedConfigError(
            f"rope_type {rope_type!r} is not supported for this model_type; supported: {', '.join(supported)}")
    # transformers 5.x moves a top-level partial_rotary_factor into rope_parameters.
    partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise UnsupportedConfigError(
            f"partial_rotary_factor {partial:g} is not supported; only 1.0 (RoPE over the whole head dimension)")
    # transformers 5.x keeps rope_theta inside rope_parameters; 4.x has it at the top level.
    return float(params.get("rope_theta", config.get("rope_theta", default)))


class Architecture:
    """Base of the per-family exporters."""

    model_type: ClassVar[str]
    default_rope_theta: ClassVar[float] = 10000.0
    # RoPE types the family exports; a family with others overrides rope_tables (and may override rope_theta).
    rope_types: ClassVar[tuple[str, ...]] = ("default",)

    # Safetensors names; {layer} and {expert} are filled in. Families override entries.
    names: ClassVar[dict[str, str]] = {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
        "lm_head_bias": "lm_head.bias",
        "input_norm": "model.layers.{layer}.input_layernorm.weight",
        "post_attention_norm": "model.layers.{layer}.post_attention_layernorm.weight",
        "q_proj": "model.layers.{layer}.self_attn.q_proj.weight",
        "k_proj": "model.layers.{layer}.self_attn.k_proj.weight",
        "v_proj": "model.layers.{layer}.self_attn.v_proj.weight",
        "o_proj": "model.layers.{layer}.self_attn.o_proj.weight",
        "q_norm": "model.layers.{layer}.self_attn.q_norm.weight",
        "k_norm": "model.layers.{layer}.self_attn.k_norm.weight",
        "q_proj_bias": "model.layers.{layer}.self_attn.q_proj.bias",
        "k_proj_bias": "model.layers.{layer}.self_attn.k_proj.bias",
        "v_proj_bias": "model.layers.{layer}.self_attn.v_proj.bias",
        "o_proj_bias": "model.layers.{layer}.self_attn.o_proj.bias",
        "router": "model.layers.{layer}.mlp.gate.weight",
        "expert_gate": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
        "expert_up": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
        "expert_down": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
        # The MLP of a dense (non-MoE) layer.
        "mlp_gate": "model.layers.{layer}.mlp.gate_proj.weight",
        "mlp_up": "model.layers.{layer}.mlp.up_proj.weight",
        "mlp_down": "model.layers.{layer}.mlp.down_proj.weight",
    }
    # "none", "per_head" (RMSNorm over D of each head, Qwen3) or "full" (over N*D, OLMoE)
    qk_norm: ClassVar[str] = "none"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.config = self.parse_config(checkpoint.config, checkpoint.generation_config)
        # Bits of the dense linear weights: None keeps them float (the graph builder's dtype),
        # 8 makes them MatMulNBits with one float32 scale per `dense_block_size` inputs.
        self.dense_bits: int | None = None
        self.dense_block_size: int | None = None

    # Config

    def expert_counts(self, config: dict) -> tuple[int, int]:
        """Number of experts and the expert intermediate size."""
        # transformers 5.x saves Qwen3-MoE's num_experts under its alias num_local_experts.
        experts = config.get("num_experts", config.get("num_local_experts"))
        if experts is None:
            raise KeyError("num_experts")
        return int(experts), int(config["moe_intermediate_size"])

    def moe_layer_flags(self, config: dict, num_layers: int) -> list[bool]:
        """Return one flag per layer, True for an MoE layer. Families with dense layers override this."""
        return [True] * num_layers

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            num_experts, intermediate = self.expert_counts(config)
            context = int(config.get("max_position_embeddings", 2048))
            window = config.get("sliding_window")
            if window and config.get("use_sliding_window", True) and int(window) < context:
                # Capping the context at the window makes full attention equal to sliding attention.
                context = int(window)
            arch = ArchConfig(
                hidden_size=hidden,
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                num_experts=num_experts,
                num_experts_per_tok=int(config["num_experts_per_tok"]),
                expert_intermediate_size=intermediate,
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=self.rope_theta(config),
                vocab_size=int(config["vocab_size"]),
                max_position_embeddings=context,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                bos_token_id=generation_config.get("bos_token_id", config.get("bos_token_id")),
                eos_token_ids=_eos_ids(config, generation_config),
                pad_token_id=config.get("pad_token_id"),
                clip_qkv=config.get("clip_qkv"),
            )
            arch.moe_layers = self.moe_layer_flags(config, arch.num_hidden_layers)
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks the field {exc}, which {self.model_type} needs") from exc
        if not 1 <= arch.num_experts_per_tok <= arch.num_experts:
            raise UnsupportedConfigError(
                f"num_experts_per_tok {arch.num_experts_per_tok} is outside 1..{arch.num_experts} "
                "(num_experts); fix config.json")
        if not any(arch.moe_layers):
            raise UnsupportedConfigError(
                f"no layer of this {self.model_type} checkpoint is an MoE layer (num_experts "
                f"{arch.num_experts}, {arch.num_hidden_layers} layers); edgemoe exports MoE models, "
                "and a dense model has no experts to stream")
        if arch.num_attention_heads % arch.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads {arch.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {arch.num_key_value_heads}")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(f"hidden_act {config['hidden_act']!r} is not supported; only silu")
        return arch

    def rope_theta(self, config: dict) -> float:
        """Return the RoPE base after checking that the config's rope_type is in `rope_types`."""
        return _rope_theta(config, self.default_rope_theta, self.rope_types)

    # Weights

    def tensor(self, role: str, layer: int | None = None, expert: int | None = None) -> np.ndarray:
        return self.checkpoint.get(self.names[role].format(layer=layer, expert=expert))

    def expert_weights(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """gate [I, H], up [I, H], down [H, I] of one expert."""
        return (self.tensor("expert_gate", layer, expert), self.tensor("expert_up", layer, expert),
                self.tensor("expert_down", layer, expert))

    def check_tensors(self) -> None:
        """Fail before writing anything if a tensor the export needs is missing."""
        missing = [name for name in self.required_names() if not self.checkpoint.has(name)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"tensor {shown} not found in the checkpoint {self.checkpoint.directory} "
                                  f"(model_type {self.model_type})")

    def required_names(self) -> list[str]:
        cfg = self.config
        roles = ["embed", "final_norm"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
        roles += ["lm_head_bias"] if cfg.lm_head_bias else []
        names = [self.names[r] for r in roles]
        for layer in range(cfg.num_hidden_layers):
            names += [self.names[r].format(layer=layer) for r in self.layer_roles(layer)]
            if cfg.moe_layers[layer]:
                names += self.expert_names(layer)
        return names

    def layer_roles(self, layer: int) -> list[str]:
        """Return the name-table roles of the tensors in one layer's dense graph."""
        roles = ["input_norm", "post_attention_norm", "q_proj", "k_proj", "v_proj", "o_proj"]
        roles += [f"{projection}_bias" for projection in self.config.attention_bias]
        if self.qk_norm != "none":
            roles += ["q_norm", "k_norm"]
        if self.config.moe_layers[layer]:
            roles.append("router")
        else:
            roles += ["mlp_gate", "mlp_up", "mlp_down"]
        return roles

    def expert_names(self, layer: int) -> list[str]:
        """Return the tensor names of all routed experts of one MoE layer."""
        return [self.names[r].format(layer=layer, expert=expert)
                for expert in range(self.config.num_experts)
                for r in ("expert_gate", "expert_up", "expert_down")]

    # Graphs

    def build_embed(self, dtype: np.dtype) -> GraphBuilder:
        """token ids [T] -> hidden [T, H]."""
        g = GraphBuilder("embed", dtype)
        ids = g.input("input_ids", TensorProto.INT64, ["T"])
        # Gather before any Cast, so an fp16 table is not widened as a whole.
        table = g.weight("embed_tokens.weight", self.tensor("embed"), widen=False)
        hidden = g.op("Gather", [table, ids], "/embed", axis=0)
        if np.dtype(dtype) != np.float32:
            hidden = g.op("Cast", [hidden], "/embed", to=TensorProto.FLOAT)
        if self.config.embedding_multiplier != 1.0:
            multiplier = g.const("/embed/multiplier", np.array(self.config.embedding_multiplier, np.float32))
            hidden = g.op("Mul", [hidden, multiplier], "/embed")
        g.output(hidden, "hidden", TensorProto.FLOAT, ["T", self.config.hidden_size])
        return g

    def build_head(self, dtype: np.dtype, embed_location: str, embed_offset: int) -> GraphBuilder:
        """hidden [T, H] -> logits [T, V] through the final norm and the LM head."""
        cfg = self.config
        g = GraphBuilder("head", dtype)
        hidden = g.input("hidden", TensorProto.FLOAT, ["T", cfg.hidden_size])
        normed = self.norm(g, hidden, "final_norm", None, "/norm")
        bias = self.tensor("lm_head_bias") if cfg.lm_head_bias else None
        if self.dense_bits is not None:
            # A tied head gets its own quantized copy of the table: the embedding's Gather
            # reads the float table, and MatMulNBits needs the packed layout.
            weight = self.tensor("embed" if cfg.tie_word_embeddings else "lm_head")
            logits = self.dense_linear(g, normed, weight, "/lm_head", bias)                # [T, V]
        else:
            if cfg.tie_word_embeddings:
                # Gemm with transB reads the [V, H] embedding table in place: no second copy on storage.
                table = g.shared_weight("embed_tokens.weight", self.tensor("embed"), embed_location, embed_offset)
            else:
                table = g.weight("lm_head.weight", self.tensor("lm_head"))
            inputs = [normed, table]
            if bias is not None:
                inputs.append(g.weight("lm_head.bias", bias))
            logits = g.op("Gemm", inputs, "/lm_head", transB=1)                           # [T, V]
        if cfg.logits_scaling != 1.0:
            scaling = g.const("/lm_head/logits_scaling", np.array(cfg.logits_scaling, np.float32))
            logits = g.op("Div", [logits, scaling], "/lm_head")
        g.output(logits, "logits", TensorProto.FLOAT, ["T", cfg.vocab_size])
        return g

    def build_layer(self, layer: int, dtype: np.dtype) -> GraphBuilder:
        """Attention, router and the dense part of the MLP block of one decoder layer.

        Inputs: hidden [T, H], position_ids [T], past_NAME for each cache tensor (past_key /
        past_value [K, P, D] unless the family declares others, see ModelConfig.cache_tensors).
        Outputs: residual [T, H] (hidden + attention), present_NAME for each cache tensor, and
        - in an MoE layer, moe_input [T, H] (the post-attention norm) and router_logits [T, E];
        - in a dense layer or a layer with a shared expert, dense_mlp_out [T, H], which the
          runtime adds to the routed experts' weighted sum.
        - in every layer before an MoE layer, next_router_logits [T, E]: layer l+1's norm and router
          applied to this layer's residual, which predicts layer l+1's experts before this layer's
          experts run.
        """
        cfg = self.config
        s = f"/layers.{layer}"
        g = GraphBuilder(f"layer_{layer}", dtype)
        hidden = g.input("hidden", TensorProto.FLOAT, ["T", cfg.hidden_size])
        position_ids = g.input("position_ids", TensorProto.INT64, ["T"])
        cache = cfg.runtime_config().cache_tensors()
        past = [g.input(f"past_{name}", TensorProto.FLOAT, ["P" if d == "S" else d for d in shape])
                for name, shape in cache]

        x = self.norm(g, hidden, "input_norm", layer, f"{s}/input_layernorm")
        attn = self.attention(g, x, position_ids, *past, layer)
        attn_out = attn[0]
        if cfg.residual_multiplier != 1.0:
            multiplier = g.const(f"{s}/residual_multiplier", np.array(cfg.residual_multiplier, np.float32))
            attn_out = g.op("Mul", [attn_out, multiplier], s)
        residual = g.op("Add", [hidden, attn_out], s)

        mlp_input = self.norm(g, residual, "post_attention_norm", layer, f"{s}/post_attention_layernorm")
        g.output(residual, "residual", TensorProto.FLOAT, ["T", cfg.hidden_size])
        if cfg.moe_layers[layer]:
            router_logits = self.router_logits(g, mlp_input, layer, f"{s}/router")      # [T, E]
            g.output(mlp_input, "moe_input", TensorProto.FLOAT, ["T", cfg.hidden_size])
            g.output(router_logits, "router_logits", TensorProto.FLOAT, ["T", cfg.num_experts])
        dense_out = self.dense_mlp(g, mlp_input, layer)
        if dense_out is not None:
            g.output(dense_out, "dense_mlp_out", TensorProto.FLOAT, ["T", cfg.hidden_size])
        for (name, shape), present in zip(cache, attn[1:]):
            g.output(present, f"present_{name}", TensorProto.FLOAT, shape)
        if layer + 1 < cfg.num_hidden_layers and cfg.moe_layers[layer + 1]:
            ahead = f"{s}/lookahead"
            next_input = self.norm(g, residual, "post_attention_norm", layer + 1, f"{ahead}/post_attention_layernorm")
            next_logits = self.router_logits(g, next_input, layer + 1, f"{ahead}/router")  # [T, E]
            g.output(next_logits, "next_router_logits", TensorProto.FLOAT, ["T", cfg.num_experts])
        return g

    def norm(self, g: GraphBuilder, x: str, role: str, layer: int | None, scope: str) -> str:
        """Normalize x [T, H] by RMSNorm with the weights of `role`. Families with another norm override this."""
        return rms_norm(g, x, self.tensor(role, layer), self.config.rms_norm_eps, scope)

    def attention(self, g: GraphBuilder, x: str, position_ids: str, past_k: str, past_v: str,
                  layer: int) -> tuple[str, str, str]:
        cfg = self.config
        s = f"/layers.{layer}/attn"
        n, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.dense_linear(g, x, self.tensor("q_proj", layer), f"{s}/q_proj",
                              self.bias("q_proj", layer))                                # [T, N*D]
        key = self.dense_linear(g, x, self.tensor("k_proj", layer), f"{s}/k_proj",
                                self.bias("k_proj", layer))                              # [T, K*D]
        value = self.dense_linear(g, x, self.tensor("v_proj", layer), f"{s}/v_proj",
                                  self.bias("v_proj", layer))                            # [T, K*D]
        if self.qk_norm == "full":
            q = rms_norm(g, q, self.tensor("q_norm", layer), cfg.rms_norm_eps, f"{s}/q_norm")
            key = rms_norm(g, key, self.tensor("k_norm", layer), cfg.rms_norm_eps, f"{s}/k_norm")
        if cfg.clip_qkv is not None:
            low = g.const(f"{s}/clip_min", np.array(-cfg.clip_qkv, np.float32))
            high = g.const(f"{s}/clip_max", np.array(cfg.clip_qkv, np.float32))
            q, key, value = (g.op("Clip", [t, low, high], s) for t in (q, key, value))

        q = reshape(g, q, [0, n, d], s)                                                  # [T, N, D]
        key = reshape(g, key, [0, k, d], s)                                              # [T, K, D]
        value = reshape(g, value, [0, k, d], s)                                          # [T, K, D]
        if self.qk_norm == "per_head":
            q = rms_norm(g, q, self.tensor("q_norm", layer), cfg.rms_norm_eps, f"{s}/q_norm")
            key = rms_norm(g, key, self.tensor("k_norm", layer), cfg.rms_norm_eps, f"{s}/k_norm")
        q = g.op("Transpose", [q], s, perm=[1, 0, 2])                                    # [N, T, D]
        key = g.op("Transpose", [key], s, perm=[1, 0, 2])                                # [K, T, D]
        value = g.op("Transpose", [value], s, perm=[1, 0, 2])                            # [K, T, D]

        cos, sin = self.rope_tables(g, position_ids, f"{s}/rope")
        q = apply_rope(g, q, cos, sin, d, f"{s}/rope_q")
        key = apply_rope(g, key, cos, sin, d, f"{s}/rope_k")

        out, all_k, all_v = causal_attention(g, q, key, value, past_k, past_v, n, k, d, s,
                                             scale=cfg.attention_multiplier, **self.attention_options(layer))
        out = self.dense_linear(g, out, self.tensor("o_proj", layer), f"{s}/o_proj",
                                self.bias("o_proj", layer))                              # [T, H]
        return out, all_k, all_v

    def rope_tables(self, g: GraphBuilder, position_ids: str, scope: str) -> tuple[str, str]:
        """cos and sin [T, D] of the positions; families with scaled RoPE override this."""
        return rope_tables(g, position_ids, self.config.head_dim, self.config.rope_theta, scope)

    def attention_options(self, layer: int) -> dict:
        """Extra keyword arguments of causal_attention for `layer` (sliding_window, sinks)."""
        return {}

    def router_logits(self, g: GraphBuilder, x: str, layer: int, scope: str) -> str:
        """Router logits [T, E] of `layer` for x [T, H].

        Never quantized: the logits choose the top-k experts, so rounding them could swap close
        choices, and a router is only E x H.
        """
        return linear(g, x, self.tensor("router", layer), scope)

    def dense_linear(self, g: GraphBuilder, x: str, weight: np.ndarray, scope: str,
                     bias: np.ndarray | None = None) -> str:
        """y = x @ weight.T (+ bias) for a resident weight [out, in], at the dense precision.

        With `dense_bits` the weight becomes a MatMulNBits node (accuracy_level 4) and the bias
        stays float32. Otherwise both are stored in the graph builder's dtype.
        """
        if self.dense_bits is None:
            return linear(g, x, weight, scope, bias)
        y = quantized_linear(g, x, weight, scope, self.dense_bits, self.dense_block_size)
        if bias is not None:
            y = g.op("Add", [y, g.raw_weight(f"{scope}.bias", np.asarray(bias, np.float32))], scope)
        return y

    def dense_swiglu(self, g: GraphBuilder, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                     scope: str) -> str:
        """Build a SwiGLU MLP that every token runs (dense layer, shared expert) at the dense precision."""
        if self.dense_bits is None:
            return swiglu_expert(g, x, gate, up, down, scope)
        return quantized_swiglu_expert(g, x, gate, up, down, scope, self.dense_bits, self.dense_block_size)

    def bias(self, projection: str, layer: int) -> np.ndarray | None:
        """Return the bias of an attention projection, or None when the config gives it none."""
        if projection not in self.config.attention_bias:
            return None
        return self.tensor(f"{projection}_bias", layer)

    def dense_mlp(self, g: GraphBuilder, x: str, layer: int) -> str | None:
        """Build the part of the MLP block that every token runs, for x [T, H].

        Returns the output [T, H] of a dense layer's SwiGLU MLP, or None in an MoE layer.
        Families with a shared expert override this.
        """
        if self.config.moe_layers[layer]:
            return None
        gate, up, down = (self.tensor(role, layer) for role in ("mlp_gate", "mlp_up", "mlp_down"))
        return self.dense_swiglu(g, x, gate, up, down, f"/layers.{layer}/mlp")          # [T, H]

    def build_expert(self, layer: int, expert: int, dtype: np.dtype, bits: int | None = None,
                     block_size: int | None = None) -> GraphBuilder:
        """x [T, H] -> y [T, H] for one expert, unweighted (the runtime applies routing weights).

        With `bits` (8, 4 or 2) the projections are quantized per block of `block_size` inputs
        and `dtype` is unused.
        """
        cfg = self.config
        g = GraphBuilder(f"expert_{layer}_{expert}", dtype)
        x = g.input("x", TensorProto.FLOAT, ["T", cfg.hidden_size])
        y = self.expert_mlp(g, x, layer, expert, bits, block_size)
        # The runtime compares these with the manifest entry when it loads the expert.
        g.metadata = {EXPERT_DTYPE_KEY: f"int{bits}" if bits else np.dtype(dtype).name.replace("float", "fp"),
                      EXPERT_BLOCK_SIZE_KEY: str(block_size) if bits else ""}
        g.output(y, "y", TensorProto.FLOAT, ["T", cfg.hidden_size])
        return g

    def expert_mlp(self, g: GraphBuilder, x: str, layer: int, expert: int, bits: int | None,
                   block_size: int | None) -> str:
        """Build one expert's MLP for x [T, H] and return y [T, H]; families with another MLP override this."""
        gate, up, down = self.expert_weights(layer, expert)
        scope = f"/layers.{layer}/experts.{expert}"
        if bits is None:
            return swiglu_expert(g, x, gate, up, down, scope)
        return quantized_swiglu_expert(g, x, gate, up, down, scope, bits, block_size)


def bundle_relative(path: Path, bundle: Path) -> str:
    return path.relative_to(bundle).as_posix()
