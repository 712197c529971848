"""Mixtral (`mixtral`): softmax top-k routing, always renormalised over the chosen experts."""

from __future__ import annotations

from edgemoe.export.architectures.base import Architecture, ArchConfig


class Mixtral(Architecture):
    model_type = "mixtral"
    # transformers 4.x defaulted Mixtral's rope_theta to 1e6.
    default_rope_theta = 1e6
    names = {
        **Architecture.names,
        "router": "model.layers.{layer}.block_sparse_moe.gate.weight",
        "expert_gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "expert_up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        "expert_down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    }

    def expert_counts(self, config: dict) -> tuple[int, int]:
        return int(config["num_local_experts"]), int(config["intermediate_size"])

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        arch.norm_topk_prob = True  # Mixtral has no such option: it always renormalises
        return arch
