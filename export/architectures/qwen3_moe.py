"""Qwen3-MoE (`qwen3_moe`): RMSNorm on each head's q and k before RoPE, optional top-k renorm."""

from __future__ import annotations

from edgemoe.export.architectures.base import Architecture, ArchConfig, UnsupportedConfigError


class Qwen3Moe(Architecture):
    model_type = "qwen3_moe"
    qk_norm = "per_head"

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        # TODO: dense MLP layers (mlp_only_layers, decoder_sparse_step > 1) are not exported yet;
        # released Qwen3-MoE checkpoints use neither.
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            raise UnsupportedConfigError(
                f"mlp_only_layers {config.get('mlp_only_layers')} / decoder_sparse_step "
                f"{config.get('decoder_sparse_step')}: dense MLP layers are not supported yet; "
                "edgemoe needs every layer to be an MoE layer (mlp_only_layers [] and decoder_sparse_step 1)")
        if config.get("attention_bias"):
            raise UnsupportedConfigError("attention_bias true is not supported for qwen3_moe yet")
        return arch
