"""Granite-MoE (`granitemoe`): fused expert tensors, scalar multipliers, top-k before the softmax.

Differences from Mixtral, as transformers 5.25 implements them:
- The checkpoint stores each layer's experts fused: `input_linear` [E, 2I, H] (gate rows first,
  then up rows) and `output_linear` [E, H, I]. The export splits them into one graph per expert.
- The embedding output is multiplied by `embedding_multiplier`; the attention and MLP outputs by
  `residual_multiplier` before each residual add; the logits are divided by `logits_scaling`.
- The attention scale is `attention_multiplier` (default 1.0, not head_dim ** -0.5).
- The router takes the top-k router logits and applies the softmax over those k only.
"""

from __future__ import annotations

import numpy as np

from edgemoe.export.architectures.base import Architecture, ArchConfig
from edgemoe.export.checkpoint import Checkpoint, CheckpointError


class GraniteMoe(Architecture):
    model_type = "granitemoe"
    names = {
        **Architecture.names,
        "router": "model.layers.{layer}.block_sparse_moe.router.layer.weight",
        "experts_gate_up": "model.layers.{layer}.block_sparse_moe.input_linear.weight",
        "experts_down": "model.layers.{layer}.block_sparse_moe.output_linear.weight",
    }

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        # The fused tensors of the layer read last, because the export visits one layer's experts in a row.
        self._fused: tuple[int, np.ndarray, np.ndarray] | None = None

    def expert_counts(self, config: dict) -> tuple[int, int]:
        return int(config["num_local_experts"]), int(config["intermediate_size"])

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        if config.get("attention_bias"):
            arch.attention_bias = ("q_proj", "k_proj", "v_proj", "o_proj")
        arch.attention_multiplier = float(config.get("attention_multiplier", 1.0))
        arch.embedding_multiplier = float(config.get("embedding_multiplier", 1.0))
        arch.residual_multiplier = float(config.get("residual_multiplier", 1.0))
        arch.logits_scaling = float(config.get("logits_scaling", 1.0))
        arch.routing = "topk_softmax"
        arch.norm_topk_prob = True  # the softmax over the top-k logits sums to 1 by construction
        return arch

    def expert_names(self, layer: int) -> list[str]:
        return [self.names[role].format(layer=layer) for role in ("experts_gate_up", "experts_down")]

    def expert_weights(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gate_up, down = self.fused_experts(layer)                                   # [E, 2I, H], [E, H, I]
        size = self.config.expert_intermediate_size
        # transformers splits gate_up_proj's output with chunk(2, dim=-1): gate first, then up.
        return gate_up[expert, :size], gate_up[expert, size:], down[expert]         # [I, H], [I, H], [H, I]

    def fused_experts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Return input_linear [E, 2I, H] and output_linear [E, H, I] of one layer, after checking
        their shapes against the config."""
        if self._fused is not None and self._fused[0] == layer:
            return self._fused[1], self._fused[2]
        cfg = self.config
        gate_up = self.tensor("experts_gate_up", layer)
        down = self.tensor("experts_down", layer)
        expected = {
            "experts_gate_up": (gate_up, (cfg.num_experts, 2 * cfg.expert_intermediate_size, cfg.hidden_size)),
            "experts_down": (down, (cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)),
        }
        for role, (array, shape) in expected.items():
            if array.shape != shape:
                raise CheckpointError(
                    f"tensor {self.names[role].format(layer=layer)} has shape {list(array.shape)}, expected "
                    f"{list(shape)} from config.json (num_local_experts, intermediate_size, hidden_size); "
                    "the checkpoint does not match its config")
        self._fused = (layer, gate_up, down)
        return gate_up, down
