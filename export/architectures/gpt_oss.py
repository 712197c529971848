"""gpt-oss (`gpt_oss`): attention sinks, alternating sliding-window layers, biased router and
experts, a clamped SwiGLU, YaRN RoPE and MXFP4 expert weights.

Differences from Mixtral, as transformers 5.25 implements them:
- Each attention head has a learned sink logit that joins the softmax denominator; q, k, v and o
  have biases (`attention_bias`).
- `layer_types` marks each layer `sliding_attention` (a query attends to its last
  `sliding_window` keys, itself included) or `full_attention`. The KV cache keeps every key in
  both kinds, and the sliding layers mask the older ones. The context is `max_position_embeddings`.
- The router has a bias; routing is top-k on the logits, then softmax over those k.
- The experts are stored fused, in `x @ W` layout: `gate_up_proj` [E, H, 2I] with gate and up in
  alternate columns (gate at even, up at odd), `down_proj` [E, I, H], and their biases. Released
  checkpoints store the two matrices in MXFP4 (`*_blocks`, `*_scales`), which the export
  dequantizes to float32; `--expert-bits` then applies as for any family.
- The expert MLP clamps the gate at `swiglu_limit` (above) and up at ±`swiglu_limit`, then
  computes (up + 1) * gate * sigmoid(`swiglu_alpha` * gate).
- RoPE is YaRN (`rope_type` "yarn") in released checkpoints; see edgemoe.export.rope_scaling.
"""

from __future__ import annotations

import numpy as np

from edgemoe.export.architectures.base import Architecture, ArchConfig, UnsupportedConfigError
from edgemoe.export.checkpoint import Checkpoint, CheckpointError
from edgemoe.export.layers import clamped_swiglu_expert, linear, rope_tables
from edgemoe.export.mxfp4 import Mxfp4Error, dequantize_mxfp4
from edgemoe.export.onnx_graph import GraphBuilder
from edgemoe.export.rope_scaling import parse_rope_scaling

LAYER_TYPES = ("sliding_attention", "full_attention")
FUSED = ("gate_up_proj", "down_proj")  # the fused expert matrices, by their checkpoint suffix


class GptOss(Architecture):
    model_type = "gpt_oss"
    default_rope_theta = 150000.0
    rope_types = ("default", "yarn")
    names = {
        **Architecture.names,
        "router": "model.layers.{layer}.mlp.router.weight",
        "router_bias": "model.layers.{layer}.mlp.router.bias",
        "sinks": "model.layers.{layer}.self_attn.sinks",
        "experts": "model.layers.{layer}.mlp.experts.",  # prefix of the fused tensors, see fused_name
    }

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        # The fused tensors of the layer read last, because the export visits one layer's experts in a row.
        self._fused: tuple[int, dict[str, np.ndarray]] | None = None

    def expert_counts(self, config: dict) -> tuple[int, int]:
        return int(config["num_local_experts"]), int(config["intermediate_size"])

    def parse_config(self, config: dict, generation_config: dict) -> ArchConfig:
        arch = super().parse_config(config, generation_config)
        # The base caps the context at sliding_window; here only the sliding layers are windowed.
        arch.max_position_embeddings = int(config.get("max_position_embeddings", 2048))
        if config.get("attention_bias", True):
            arch.attention_bias = ("q_proj", "k_proj", "v_proj", "o_proj")
        arch.routing = "topk_softmax"
        arch.norm_topk_prob = True  # the softmax over the top-k logits sums to 1 by construction
        arch.extra = {"layer_windows": self._layer_windows(config, arch.num_hidden_layers),
                      "swiglu_alpha": float(config.get("swiglu_alpha", 1.702)),
                      "swiglu_limit": float(config.get("swiglu_limit", 7.0)),
                      "rope": self._rope(config, arch)}
        quantization = config.get("quantization_config")
        if quantization and quantization.get("quant_method") != "mxfp4":
            raise UnsupportedConfigError(
                f"quantization_config.quant_method {quantization.get('quant_method')!r} is not supported for "
                "gpt_oss; supported: mxfp4 or an unquantized checkpoint")
        return arch

    @staticmethod
    def _layer_windows(config: dict, num_layers: int) -> list[int | None]:
        """Return each layer's sliding window, None for a full-attention layer."""
        # transformers' default: even layers are sliding, odd layers full.
        types = config.get("layer_types") or [LAYER_TYPES[layer % 2] for layer in range(num_layers)]
        if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
            raise UnsupportedConfigError(
                f"layer_types {types} is invalid: expected {num_layers} entries (num_hidden_layers), each one of "
                f"{', '.join(LAYER_TYPES)}; fix config.json")
        window = config.get("sliding_window")
        if "sliding_attention" in types and (not isinstance(window, int) or window < 1):
            raise UnsupportedConfigError(
                f"sliding_window {window!r} is invalid for a sliding_attention layer: it must be a positive "
                "integer; fix config.json")
        return [window if t == "sliding_attention" else None for t in types]

    @classmethod
    def _rope(cls, config: dict, arch: ArchConfig) -> dict:
        """Return the RoPE tables' inputs: {"inv_freq": [D/2] or None (default RoPE), "attention_factor"}."""
        rope = parse_rope_scaling(config, cls.default_rope_theta)
        if rope.rope_type == "default":
            return {"inv_freq": None, "attention_factor": 1.0}
        return {"inv_freq": rope.inv_freq(arch.head_dim).tolist(), "attention_factor": rope.cos_sin_factor}

    # Tensors

    def layer_roles(self, layer: int) -> list[str]:
        return super().layer_roles(layer) + ["sinks", "router_bias"]

    def fused_name(self, layer: int, suffix: str) -> str:
        """Return the checkpoint name of a fused expert tensor, such as `gate_up_proj_bias`."""
        return self.names["experts"].format(layer=layer) + suffix

    def is_mxfp4(self, layer: int, matrix: str) -> bool:
        return self.checkpoint.has(self.fused_name(layer, f"{matrix}_blocks"))

    def expert_names(self, layer: int) -> list[str]:
        names = []
        for matrix in FUSED:
            parts = ("_blocks", "_scales") if self.is_mxfp4(layer, matrix) else ("",)
            names += [self.fused_name(layer, matrix + part) for part in parts + ("_bias",)]
        return names

    def fused_experts(self, layer: int) -> dict[str, np.ndarray]:
        """Return one layer's fused expert tensors by FUSED suffix (plus `_bias`), shapes checked.

        A float matrix is returned in [E, out, in] layout (a transposed view), an MXFP4 one as its
        `_blocks` and `_scales`, which expert_weights dequantizes one expert at a time.
        """
        if self._fused is not None and self._fused[0] == layer:
            return self._fused[1]
        cfg = self.config
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        expected = {"gate_up_proj_bias": (e, 2 * i), "down_proj_bias": (e, h)}
        for matrix, (rows, cols) in zip(FUSED, ((2 * i, h), (h, i))):
            if self.is_mxfp4(layer, matrix):
                groups = -(-cols // 32)
                expected[f"{matrix}_blocks"] = (e, rows, groups, 16)
                expected[f"{matrix}_scales"] = (e, rows, groups)
            else:
                expected[matrix] = (e, cols, rows)  # stored as x @ W: [E, in, out]
        tensors = {}
        for suffix, shape in expected.items():
            array = self.checkpoint.get(self.fused_name(layer, suffix))
            if array.shape != shape:
                raise CheckpointError(
                    f"tensor {self.fused_name(layer, suffix)} has shape {list(array.shape)}, expected {list(shape)} "
                    "from config.json (num_local_experts, intermediate_size, hidden_size); the checkpoint does "
                    "not match its config")
            tensors[suffix] = array.transpose(0, 2, 1) if suffix in FUSED else array
        self._fused = (layer, tensors)
        return tensors

    def expert_matrix(self, layer: int, expert: int, matrix: str) -> np.ndarray:
        """Return one expert's gate_up_proj [2I, H] or down_proj [H, I], in [out, in] layout."""
        tensors = self.fused_experts(layer)
        if matrix in tensors:
            return tensors[matrix][expert]
        blocks, scales = tensors[f"{matrix}_blocks"][expert], tensors[f"{matrix}_scales"][expert]
        try:
            weight = dequantize_mxfp4(blocks, scales)                                   # [out, groups * 32]
        except Mxfp4Error as exc:
            raise CheckpointError(f"{self.fused_name(layer, matrix)} of expert {expert}: {exc}") from exc
        columns = self.config.hidden_size if matrix == "gate_up_proj" else self.config.expert_intermediate_size
        return weight[:, :columns]

    def expert_weights(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gate_up = self.expert_matrix(layer, expert, "gate_up_proj")                    # [2I, H]
        # transformers reads gate from the even and up from the odd outputs (gate_up[..., ::2]).
        return gate_up[0::2], gate_up[1::2], self.expert_matrix(layer, expert, "down_proj")  # [I,H], [I,H], [H,I]

    def expert_biases(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tensors = self.fused_experts(layer)
        gate_up = tensors["gate_up_proj_bias"][expert]                                 # [2I]
        return gate_up[0::2], gate_up[1::2], tensors["down_proj_bias"][expert]         # [I], [I], [H]

    # Graphs

    def rope_tables(self, g: GraphBuilder, position_ids: str, scope: str) -> tuple[str, str]:
        rope = self.config.extra["rope"]
        if rope["inv_freq"] is None:
            return super().rope_tables(g, position_ids, scope)
        return rope_tables(g, position_ids, self.config.head_dim, self.config.rope_theta, scope,
                           inv_freq=np.array(rope["inv_freq"], np.float32), factor=rope["attention_factor"])

    def attention_options(self, layer: int) -> dict:
        return {"sliding_window": self.config.extra["layer_windows"][layer], "sinks": self.tensor("sinks", layer)}

    def router_logits(self, g: GraphBuilder, x: str, layer: int, scope: str) -> str:
        return linear(g, x, self.tensor("router", layer), scope, self.tensor("router_bias", layer))

    def expert_mlp(self, g: GraphBuilder, x: str, layer: int, expert: int, bits: int | None,
                   block_size: int | None) -> str:
        gate, up, down = self.expert_weights(layer, expert)
        extra = self.config.extra
        return clamped_swiglu_expert(g, x, gate, up, down, self.expert_biases(layer, expert), extra["swiglu_alpha"],
                                     extra["swiglu_limit"], f"/layers.{layer}/experts.{expert}", bits, block_size)
