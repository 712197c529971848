"""Qwen2-MoE (`qwen2_moe`): a gated shared expert in every MoE layer, dense MLP layers, q/k/v biases.

Each MoE layer adds `sigmoid(shared_expert_gate(x)) * shared_expert(x)` to the routed experts'
weighted sum. The shared expert runs for every token, so it is built into the layer's dense graph
and never counts against the expert budget. A layer is an MoE layer unless it is listed in
`mlp_only_layers` or `(layer + 1) % decoder_sparse_step != 0`. Every other layer has one SwiGLU
MLP of width `intermediate_size`, which also goes into the dense graph.
"""

from __future__ import annotations

from edgemoe.export.architectures.base import Architecture, ArchConfig, UnsupportedConfigError
from edgemoe.export.checkpoint import CheckpointError
from edgemoe.export.layers import linear
from edgemoe.export.onnx_graph import GraphBuilder


class Qwen2Moe(Architecture):
    model_type = "qwen2_moe"
    names = {
        **Architecture.names,
        "shared_gate": "model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
        "shared_up": "model.layers.{layer}.mlp.shared_expert.up_proj.weight",
        "shared_down": "model.layers.{layer}.mlp.shared_expert.down_proj.weight",
        "shared_expert_gate": "model.layers.{layer}.mlp.shared_expert_gate.weight",
    }

    def moe_layer_flags(self, config: dict, num_layers: int) -> list[bool]:
        step = int(config.get("decoder_sparse_step", 1))
        if step < 1:
            raise UnsupportedConfigError(
                f"decoder_sparse_step {step} is invalid: it must be 1 or more (every step-th layer is "
                "an MoE layer); fix config.json")
        dense_layers = {int(layer) for layer in config.get("mlp_only_layers") or []}
        has_experts = int(config.get("num_experts", 0)) > 0
        # The condition of transformers' Qwen2MoeDecoderLayer; indices outside the model never match.
        return [has_experts and layer not in dense_layers and (layer + 1) % step == 0
                for layer in range(num_layers)]

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        # Checkpoints saved by transformers 4.x have no qkv_bias field and always have the biases.
        arch.attention_bias = ("q_proj", "k_proj", "v_proj") if config.get("qkv_bias", True) else ()
        try:
            arch.shared_expert_intermediate_size = int(config["shared_expert_intermediate_size"])
            if not all(arch.moe_layers):
                arch.dense_intermediate_size = int(config["intermediate_size"])
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks the field {exc}, which {self.model_type} needs") from exc
        return arch

    def layer_roles(self, layer: int) -> list[str]:
        roles = super().layer_roles(layer)
        if self.config.moe_layers[layer]:
            roles += ["shared_gate", "shared_up", "shared_down", "shared_expert_gate"]
        return roles

    def dense_mlp(self, g: GraphBuilder, x: str, layer: int) -> str | None:
        if not self.config.moe_layers[layer]:
            return super().dense_mlp(g, x, layer)
        s = f"/layers.{layer}/shared_expert"
        gate, up, down = (self.tensor(role, layer) for role in ("shared_gate", "shared_up", "shared_down"))
        shared = self.dense_swiglu(g, x, gate, up, down, s)                              # [T, H]
        # The [1, H] gate stays float: one output row is too small to gain from quantizing.
        gate_logit = linear(g, x, self.tensor("shared_expert_gate", layer), f"{s}_gate")  # [T, 1]
        return g.op("Mul", [g.op("Sigmoid", [gate_logit], s), shared], s)               # [T, H]
