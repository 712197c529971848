"""gpt-oss export: MXFP4 dequantization, YaRN, sliding windows, the clamped SwiGLU expert, config checks.

Invariants checked (logit parity with transformers is in test_parity.py):
- dequantize_mxfp4 decodes E2M1 codes and E8M0 scales as the OCP Microscaling v1.0 specification
  defines them, element 2i from the low nibble. It rejects the NaN scale and mismatched shapes.
- The MXFP4 fixture's dequantized experts equal the float fixture's within MXFP4 rounding (a
  quarter of each 32-value block's max|w|).
- YaRN (parse_rope_scaling) keeps the original frequencies below the ramp, divides them by `factor` above
  it, and returns the attention factor 0.1 * ln(factor) + 1.
- The fixture's prompt plus greedy tokens outgrow the sliding window, and only the sliding
  layers' graphs carry a window.
- A clamped SwiGLU expert graph with int8 or int4 projections and float biases matches numpy on
  the dequantized weights within 3 % of max|y| (accuracy_level 4 quantizes activations too).
- Config values the export does not implement are rejected with the field named.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from conftest import checkpoint_dir
from edgemoe.export.architectures import UnsupportedConfigError, architecture_for
from edgemoe.export.checkpoint import Checkpoint
from edgemoe.export.mxfp4 import Mxfp4Error, dequantize_mxfp4, e2m1_values
from edgemoe.export.quantize import dequantize, quantize
from edgemoe.export.rope_scaling import parse_rope_scaling
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.engine import Engine
from edgemoe.runtime.sessions import expert_session

MODEL = "tiny-gpt-oss"
MXFP4_MODEL = "tiny-gpt-oss-mxfp4"


def clamped_swiglu(x, gate, up, down, biases, alpha, limit):
    g = np.minimum(x @ gate.T + biases[0], limit)
    u = np.clip(x @ up.T + biases[1], -limit, limit)
    return ((u + 1) * g / (1 + np.exp(-alpha * g))) @ down.T + biases[2]


# MXFP4


def test_e2m1_table_matches_spec():
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert e2m1_values().tolist() == expected


def test_mxfp4_hand_decoded_block():
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, :3] = [0x21, 0xF7, 0x98]  # codes 1, 2 | 7, 15 | 8, 9
    scales = np.array([[128]], np.uint8)   # 2 ** (128 - 127)

    weight = dequantize_mxfp4(blocks, scales)

    assert weight.shape == (1, 32)
    assert weight[0, :6].tolist() == [1.0, 2.0, 12.0, -12.0, -0.0, -1.0]
    assert not weight[0, 6:].any()


def test_mxfp4_nan_scale_rejected():
    with pytest.raises(Mxfp4Error, match="255"):
        dequantize_mxfp4(np.zeros((2, 1, 16), np.uint8), np.array([[127], [255]], np.uint8))


def test_mxfp4_shape_mismatch_rejected():
    with pytest.raises(Mxfp4Error, match="do not fit"):
        dequantize_mxfp4(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 2), np.uint8))


def test_mxfp4_experts_close_to_float():
    float_arch = architecture_for(Checkpoint(checkpoint_dir(MODEL)))
    mxfp4_arch = architecture_for(Checkpoint(checkpoint_dir(MXFP4_MODEL)))
    assert mxfp4_arch.is_mxfp4(0, "gate_up_proj")

    for layer in range(float_arch.config.num_hidden_layers):
        for expert in range(float_arch.config.num_experts):
            for exact, rounded in zip(float_arch.expert_weights(layer, expert),
                                      mxfp4_arch.expert_weights(layer, expert)):
                assert rounded.shape == exact.shape
                # A block's largest value maps into [4, 8) and rounds to at most 6; steps are at most 2.
                block_max = np.abs(exact.reshape(exact.shape[0], -1, 32)).max(axis=-1, keepdims=True)
                error = np.abs(rounded - exact).reshape(exact.shape[0], -1, 32)
                assert (error <= 0.25 * block_max).all(), f"layer {layer} expert {expert}"


# YaRN and sliding windows


def test_yarn_ramps_between_extrapolation_and_interpolation():
    params = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "truncate": False, "original_max_position_embeddings": 64}
    head_dim = 16
    original = 1.0 / 1000.0 ** (np.arange(0, head_dim, 2) / head_dim)

    rope = parse_rope_scaling({"rope_parameters": params, "max_position_embeddings": 256})
    inv_freq, attention_factor = rope.inv_freq(head_dim), rope.cos_sin_factor

    # The ramp runs from dimension pair 0 to 16 * ln(64 / 2pi) / (2 ln 1000) = 2.69.
    high = head_dim * math.log(64 / (2 * math.pi)) / (2 * math.log(1000.0))
    share = np.clip(np.arange(head_dim // 2) / high, 0, 1)
    expected = original * (1 - share) + original / 4.0 * share
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    assert inv_freq[0] == pytest.approx(original[0])
    assert attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)


def test_sliding_window_exercised(load_reference, bundle_path):
    config = json.loads((checkpoint_dir(MODEL) / "config.json").read_text())
    reference = load_reference(MODEL)
    assert len(reference.prompt_ids) + len(reference.greedy_ids) > config["sliding_window"]

    bundle = bundle_path(MODEL)
    for layer, layer_type in enumerate(config["layer_types"]):
        graph = onnx.load(bundle / "layers" / f"layer_{layer:02d}.onnx", load_external_data=False)
        windows = [onnx.numpy_helper.to_array(t) for t in graph.graph.initializer
                   if t.name.endswith("/sliding_window")]
        expected = [config["sliding_window"]] if layer_type == "sliding_attention" else []
        assert [int(w) for w in windows] == expected, f"layer {layer} ({layer_type})"


# Quantized experts


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_expert_matches_numpy(bits, tmp_path):
    arch = architecture_for(Checkpoint(checkpoint_dir(MODEL)))
    extra = arch.config.extra
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, arch.config.hidden_size)).astype(np.float32)
    weights = [dequantize(quantize(w, bits, 32)) for w in arch.expert_weights(1, 2)]
    expected = clamped_swiglu(x, *weights, arch.expert_biases(1, 2), extra["swiglu_alpha"], extra["swiglu_limit"])

    graph_path, _, _ = arch.build_expert(1, 2, np.float32, bits=bits, block_size=32).save(tmp_path, "expert")
    y = expert_session(str(graph_path), prepack=True).run(None, {"x": x})[0]

    scale = float(np.abs(expected).max())
    error = float(np.abs(y - expected).max())
    assert error <= 0.03 * scale, f"max-abs error {error:.3g}, max|y| {scale:.3g}"


def test_mxfp4_checkpoint_exports_int4(tmp_path):
    bundle = tmp_path / "int4"
    export_checkpoint(checkpoint_dir(MXFP4_MODEL), bundle, expert_bits=4, progress=False)
    engine = Engine(bundle)

    assert {entry.bits for entry in engine.manifest.experts} == {4}
    logits = engine.forward(np.arange(12), engine.new_cache())
    assert np.isfinite(logits).all()


# Config checks


@pytest.mark.parametrize("field,value,named", [
    ("layer_types", ["sliding_attention", "chunked_attention"] * 2, "layer_types"),
    ("sliding_window", None, "sliding_window"),
    ("quantization_config", {"quant_method": "gptq"}, "gptq"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0}, "llama3"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "partial_rotary_factor": 0.5,
                         "original_max_position_embeddings": 64}, "partial_rotary_factor"),
    # transformers moves a top-level partial_rotary_factor into rope_parameters.
    ("partial_rotary_factor", 0.5, "partial_rotary_factor 0.5"),
])
def test_unsupported_config_named(field, value, named, checkpoint_copy):
    checkpoint = checkpoint_copy(MODEL)
    config = json.loads((checkpoint / "config.json").read_text())
    config[field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnsupportedConfigError, match=named):
        architecture_for(Checkpoint(checkpoint))
