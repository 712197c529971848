"""OLMoE (`olmoe`): RMSNorm over the whole projected q and k, optional clipping of q, k, v."""

from __future__ import annotations

from edgemoe.export.architectures.base import Architecture, ArchConfig, UnsupportedConfigError


class Olmoe(Architecture):
    model_type = "olmoe"
    qk_norm = "full"

    def expert_counts(self, config: dict) -> tuple[int, int]:
        return int(config["num_experts"]), int(config["intermediate_size"])

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        if config.get("attention_bias"):
            raise UnsupportedConfigError("attention_bias true is not supported for olmoe yet")
        return arch
