"""DeepSeek-V2/V3: group routing, the compressed MLA cache, and what the export rejects.

Invariants checked:
- Group-limited routing matches hand-computed choices: V2 keeps the groups with the highest max
  softmax probability, V3 the groups with the largest sum of their two best biased sigmoid
  scores. V3's e_score_correction_bias changes which experts are chosen but not their weights.
  Both scale the weights by routed_scaling_factor.
- The choice logits that the predictors see rank experts as the routing chooses them.
- The runtime cache stores c_kv and k_pe, (kv_lora_rank + qk_rope_head_dim) float32 values per
  layer and token, and bundles without a kv_cache field still get key and value.
- The manifest stores V3's e_score_correction_bias exactly, and a manifest with a wrong bias
  length or an unknown routing parameter is rejected.
- An FP8 checkpoint (e4m3 weights with weight_scale_inv blocks) exports to exactly what the
  float32 checkpoint of its dequantized weights exports to.
- Options that edgemoe does not implement are rejected at export, naming the field and value.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from conftest import checkpoint_dir
from edgemoe.export.architectures import UnsupportedConfigError
from edgemoe.export.checkpoint import E4M3FN_VALUES, Checkpoint, CheckpointError
from edgemoe.export.rope_scaling import parse_rope_scaling
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.engine import Engine
from edgemoe.runtime.manifest import MANIFEST_NAME, BundleError, load_manifest
from edgemoe.runtime.routing import (choice_logits_sigmoid_group, choice_logits_softmax_group,
                                     route_sigmoid_group_topk, route_softmax_group_topk)

V2, V3 = "tiny-deepseek-v2", "tiny-deepseek-v3"


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p)).astype(np.float32)


# Routing


def test_v2_group_limited_choice():
    # 6 experts in 3 groups of 2; the best experts of groups 0 and 2 are the two highest.
    logits = np.log(np.array([[0.30, 0.01, 0.20, 0.19, 0.05, 0.25]], np.float32))
    weights, experts = route_softmax_group_topk(logits, 2, False, n_group=3, topk_group=2,
                                                routed_scaling_factor=2.0)
    probs = np.exp(logits) / np.exp(logits).sum()

    # Without groups, expert 2 (0.20) would beat expert 4 (0.05) but group 1 is dropped.
    assert experts.tolist() == [[0, 5]]
    np.testing.assert_allclose(weights, 2.0 * probs[:, [0, 5]], rtol=1e-6)


def test_v2_greedy_is_plain_top_k():
    logits = np.log(np.array([[0.30, 0.01, 0.20, 0.19, 0.05, 0.25]], np.float32))
    _, experts = route_softmax_group_topk(logits, 3, False)

    assert experts.tolist() == [[0, 5, 2]]


def test_v3_groups_score_top_two_sum():
    # Group 0 has the single best expert (0.9 + 0.1 = 1.0); group 1 the best pair (0.6 + 0.6 = 1.2).
    scores = np.array([[0.9, 0.1, 0.6, 0.6, 0.5, 0.45]], np.float32)
    _, experts = route_sigmoid_group_topk(_logit(scores), 2, True, n_group=3, topk_group=1)

    assert experts.tolist() == [[2, 3]]


def test_v3_bias_chooses_but_does_not_weigh():
    scores = np.array([[0.9, 0.8, 0.3, 0.2]], np.float32)
    bias = np.array([0.0, 0.0, 0.7, 0.0], np.float32)
    weights, experts = route_sigmoid_group_topk(_logit(scores), 2, True, routed_scaling_factor=2.5,
                                                e_score_correction_bias=bias)

    # Biased scores are 0.9, 0.8, 1.0, 0.2: experts 2 and 0 win, weighted by 0.3 and 0.9.
    assert experts.tolist() == [[2, 0]]
    np.testing.assert_allclose(weights, [[2.5 * 0.3 / 1.2, 2.5 * 0.9 / 1.2]], rtol=1e-5)


def test_v3_without_normalization_keeps_scores():
    scores = np.array([[0.9, 0.8, 0.3, 0.2]], np.float32)
    weights, _ = route_sigmoid_group_topk(_logit(scores), 2, False, routed_scaling_factor=2.0)

    np.testing.assert_allclose(weights, [[1.8, 1.6]], rtol=1e-5)


def test_choice_logits_rank_like_routing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 12)).astype(np.float32) * 2
    bias = rng.normal(size=12).astype(np.float32) * 0.3
    params = {"n_group": 4, "topk_group": 2}

    _, v2 = route_softmax_group_topk(logits, 3, False, **params)
    _, v3 = route_sigmoid_group_topk(logits, 3, True, e_score_correction_bias=bias, **params)
    ranked_v2 = np.argsort(-choice_logits_softmax_group(logits, **params), axis=-1, kind="stable")[:, :3]
    ranked_v3 = np.argsort(-choice_logits_sigmoid_group(logits, e_score_correction_bias=bias, **params),
                           axis=-1, kind="stable")[:, :3]

    np.testing.assert_array_equal(ranked_v2, v2)
    np.testing.assert_array_equal(ranked_v3, v3)


# Cache and manifest


@pytest.mark.parametrize("model", [V2, V3])
def test_cache_holds_latent_and_rope_key(model, bundle_path):
    config = json.loads((checkpoint_dir(model) / "config.json").read_text())
    engine = Engine(bundle_path(model))
    cache = engine.new_cache()

    engine.forward(np.arange(1, 8), cache)

    per_token = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    expanded = config["num_attention_heads"] * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
                                                + config["v_head_dim"])
    assert [name for name, _ in engine.config.cache_tensors()] == ["c_kv", "k_pe"]
    assert cache.length == 7
    assert cache.nbytes == 4 * per_token * config["num_hidden_layers"] * 7
    assert per_token < expanded


def test_routing_stats_count_tokens_after_dense_layer(bundle_path):
    # Layer 0 is dense (first_k_dense_replace 1), so tokens are counted at layer 1.
    engine = Engine(bundle_path("tiny-deepseek-v3"))

    engine.forward(np.arange(1, 8), engine.new_cache())

    assert engine.routing.tokens == 7
    assert engine.routing.counts[0].sum() == 0
    assert engine.routing.counts[1].sum() == 7 * engine.config.num_experts_per_tok


def test_old_manifest_defaults_to_key_value(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    cfg = manifest.config

    assert cfg.kv_cache is None
    assert cfg.cache_tensors() == [("key", [cfg.num_key_value_heads, "S", cfg.head_dim]),
                                   ("value", [cfg.num_key_value_heads, "S", cfg.head_dim])]


def test_v3_manifest_keeps_router_bias(bundle_path):
    manifest = load_manifest(bundle_path(V3))
    checkpoint = Checkpoint(checkpoint_dir(V3))

    assert manifest.config.routing == "sigmoid_group_topk"
    assert manifest.config.routing_params == {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}
    assert manifest.config.router_bias[0] is None
    for layer in (1, 2):
        stored = np.asarray(manifest.config.router_bias[layer], np.float32)
        expected = checkpoint.get(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
        np.testing.assert_array_equal(stored, expected)


@pytest.mark.parametrize("field, value, message", [
    ("router_bias", [None, [0.0] * 5, [0.0] * 12], "router_bias has lengths"),
    ("routing_params", {"n_group": 4, "topk_group": 2, "jitter": 0.1}, "routing_params jitter"),
    ("kv_cache", [{"name": "c_kv", "shape": [24]}], "kv_cache tensor 'c_kv'"),
])
def test_invalid_manifest_field_rejected(bundle_path, tmp_path, field, value, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_path(V3), bundle)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["config"][field] = value
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match=message):
        load_manifest(bundle)


# Export checks


def test_yarn_matches_deepseek_v2_lite_scale():
    # DeepSeek-V2-Lite's rope_scaling: its mscale equals mscale_all_dim, so cos and sin keep
    # factor 1 and the softmax scale gains (0.1 * 0.707 * ln 40 + 1) ** 2.
    config = {"max_position_embeddings": 163840, "rope_theta": 10000,
              "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
    rope = parse_rope_scaling(config)

    assert rope.cos_sin_factor == pytest.approx(1.0)
    assert rope.softmax_scale_factor == pytest.approx((0.1 * 0.707 * np.log(40) + 1) ** 2)
    inv_freq = rope.inv_freq(64)
    assert inv_freq[0] == pytest.approx(1.0)  # the fastest dims keep their frequency
    assert inv_freq[-1] == pytest.approx(10000 ** (-62 / 64) / 40, rel=1e-5)  # the slowest are stretched


@pytest.mark.parametrize("model, change, message", [
    (V3, {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq'"),
    (V3, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
     "weight_block_size \\[128\\]"),
    (V2, {"moe_layer_freq": 2}, "moe_layer_freq 2"),
    (V2, {"norm_topk_prob": True}, "norm_topk_prob true"),
    (V2, {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
    (V3, {"topk_method": "greedy"}, "topk_method 'greedy'"),
    (V3, {"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    (V2, {"n_group": 3}, "n_group 3"),
    (V3, {"n_group": 12}, "n_group 12"),
    (V3, {"topk_group": 5}, "topk_group 5"),
    (V2, {"num_key_value_heads": 2}, "num_key_value_heads 2"),
    (V2, {"mlp_bias": True}, "mlp_bias"),
    (V3, {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     "rope_type 'dynamic'"),
])
def test_unsupported_option_rejected(checkpoint_copy, tmp_path, model, change, message):
    checkpoint = checkpoint_copy(model)
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(change)
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnsupportedConfigError, match=message):
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# FP8 checkpoints

FP8_BLOCK = (8, 8)  # smaller than the tensors, and not dividing q_b_proj's 20 columns


def _to_fp8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize `weight` [O, I] per FP8_BLOCK block: e4m3 codes, float32 scales, dequantized weight."""
    rows, columns = FP8_BLOCK
    blocks = (-(-weight.shape[0] // rows), -(-weight.shape[1] // columns))
    scales = np.zeros(blocks, np.float32)
    for i in range(blocks[0]):
        for j in range(blocks[1]):
            scales[i, j] = np.abs(weight[i * rows:(i + 1) * rows, j * columns:(j + 1) * columns]).max() / 448
    full = np.repeat(np.repeat(scales, rows, 0), columns, 1)[:weight.shape[0], :weight.shape[1]]
    finite = np.flatnonzero(np.isfinite(E4M3FN_VALUES))
    order = finite[np.argsort(E4M3FN_VALUES[finite])]
    values = E4M3FN_VALUES[order]
    position = np.clip(np.searchsorted(values, weight / full), 1, len(values) - 1)
    nearer_low = np.abs(weight / full - values[position - 1]) <= np.abs(values[position] - weight / full)
    codes = order[np.where(nearer_low, position - 1, position)].astype(np.uint8)
    return codes, scales, E4M3FN_VALUES[codes] * full


def _write_raw_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """Write uint8 arrays as F8_E4M3 and the others as F32."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array if array.dtype == np.uint8 else array.astype("<f4")).tobytes()
        dtype = "F8_E4M3" if array.dtype == np.uint8 else "F32"
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs))


def test_fp8_checkpoint_dequantized(checkpoint_copy, write_safetensors, tmp_path):
    fp8_dir, float_dir = checkpoint_copy(V3), tmp_path / "dequantized"
    shutil.copytree(fp8_dir, float_dir)
    source = Checkpoint(fp8_dir)
    fp8_tensors, float_tensors = {}, {}
    for name in source.names():
        array = source.get(name)
        quantized = array.ndim == 2 and ".layers." in name and ".mlp.gate." not in name
        if quantized:
            codes, scales, array = _to_fp8(array)
            fp8_tensors[name], fp8_tensors[f"{name}_scale_inv"] = codes, scales
        else:
            fp8_tensors[name] = array
        float_tensors[name] = array
    _write_raw_safetensors(fp8_dir / "model.safetensors", fp8_tensors)
    write_safetensors(float_dir / "model.safetensors", float_tensors)
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK)}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    export_checkpoint(fp8_dir, tmp_path / "fp8-bundle", progress=False)
    export_checkpoint(float_dir, tmp_path / "float-bundle", progress=False)
    ids = np.arange(1, 12)
    fp8_engine, float_engine = Engine(tmp_path / "fp8-bundle"), Engine(tmp_path / "float-bundle")
    fp8_logits = fp8_engine.forward(ids, fp8_engine.new_cache(), all_logits=True)
    float_logits = float_engine.forward(ids, float_engine.new_cache(), all_logits=True)

    assert Checkpoint(fp8_dir).dtype("model.layers.1.self_attn.q_b_proj.weight") == "F8_E4M3"
    np.testing.assert_array_equal(fp8_logits, float_logits)


def test_fp8_weight_without_scale_rejected(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy(V3)
    source = Checkpoint(checkpoint)
    tensors = {name: source.get(name) for name in source.names()}
    codes, _, _ = _to_fp8(tensors["model.layers.0.self_attn.o_proj.weight"])
    tensors["model.layers.0.self_attn.o_proj.weight"] = codes
    _write_raw_safetensors(checkpoint / "model.safetensors", tensors)

    with pytest.raises(CheckpointError, match="o_proj.weight is FP8"):
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)
