"""Shared experts and dense MLP layers stay in the dense graphs; fused experts are split.

Invariants checked:
- In a Qwen2-MoE bundle only the routed experts of MoE layers are in the manifest's expert
  list. The shared experts and the dense layers' MLPs are weights of the layer graphs, so the
  manifest and the export summary count them as dense bytes, and the expert budget ignores them.
- With the smallest allowed budget, generation only ever loads experts of MoE layers.
- Manifest lookups of an expert in a dense layer raise BundleError, and a manifest that lists
  experts for a dense layer is rejected.
- Granite's routing (top-k on the logits, then softmax over those k) matches hand-computed
  weights, keeps the lower index on ties, and picks what softmax-then-top-k with
  renormalisation picks.
- Invalid decoder_sparse_step values and fused expert tensors that do not match the config are
  rejected with the value and the expected range or shape.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import onnx
import pytest

from conftest import checkpoint_dir
from edgemoe.export.architectures import UnsupportedConfigError
from edgemoe.export.checkpoint import Checkpoint, CheckpointError
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.manifest import BundleError, load_manifest
from edgemoe.runtime.routing import route_softmax_topk, route_topk_softmax

QWEN2 = "tiny-qwen2-moe"
# decoder_sparse_step 2 and mlp_only_layers [3] in the fixture config.
QWEN2_MOE_LAYERS = [False, True, False, False, False, True]
QWEN2_EXPERTS = 10
EXPERT_FILE = re.compile(r"experts/l(\d\d)_e(\d\d\d)\.(onnx|bin)")


def layer_weight_names(bundle, manifest, layer: int) -> list[str]:
    """Names of the weights that one layer graph keeps in its external-data file."""
    model = onnx.load(str(bundle / manifest.graphs["layers"][layer]), load_external_data=False)
    return [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


@pytest.fixture(scope="module")
def qwen2_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2") / "bundle"
    summary = export_checkpoint(checkpoint_dir(QWEN2), out, progress=False)
    return out, summary


# Qwen2-MoE: shared experts and dense layers


def test_expert_list_has_only_moe_layers(qwen2_export):
    bundle, summary = qwen2_export
    manifest = load_manifest(bundle)

    assert manifest.config.moe_layers == QWEN2_MOE_LAYERS
    keys = sorted((e.layer, e.index) for e in manifest.experts)
    assert keys == [(layer, index) for layer in (1, 5) for index in range(QWEN2_EXPERTS)]
    for entry in manifest.experts:
        for name in (entry.file, entry.data_file):
            match = EXPERT_FILE.fullmatch(name)
            assert match, name
            assert int(match.group(1)) == entry.layer
            assert int(match.group(2)) == entry.index
    assert summary.moe_layers == 2
    assert summary.layers == 6


def test_shared_expert_in_layer_graph(qwen2_export):
    bundle, _ = qwen2_export
    manifest = load_manifest(bundle)

    for layer, is_moe in enumerate(QWEN2_MOE_LAYERS):
        names = layer_weight_names(bundle, manifest, layer)
        shared = [n for n in names if "/shared_expert" in n]
        dense_mlp = [n for n in names if n.startswith(f"/layers.{layer}/mlp/")]
        router = [n for n in names if "/router" in n and "/lookahead/" not in n]
        if is_moe:
            # gate_proj, up_proj, down_proj and shared_expert_gate
            assert len(shared) == 4, names
            assert dense_mlp == []
            assert len(router) == 1
        else:
            assert shared == []
            assert len(dense_mlp) == 3, names
            assert router == []


def test_shared_and_dense_mlp_counted_dense(qwen2_export):
    bundle, summary = qwen2_export
    manifest = load_manifest(bundle)
    checkpoint = Checkpoint(checkpoint_dir(QWEN2))

    # Bytes of the shared experts and dense MLPs, from the checkpoint (float32).
    dense_mlp = re.compile(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight")
    always_run = sum(checkpoint.get(name).nbytes for name in checkpoint.names()
                     if ".mlp.shared_expert" in name or dense_mlp.fullmatch(name))
    assert always_run > 0

    expert_files = {e.file for e in manifest.experts} | {e.data_file for e in manifest.experts}
    layer_files = [name for name in manifest.files if name.startswith("layers/")]
    assert not expert_files & set(layer_files)
    layer_bytes = sum(manifest.files[name].bytes for name in layer_files)
    assert layer_bytes > always_run
    assert summary.dense_bytes == manifest.dense_bytes
    assert summary.dense_bytes > layer_bytes

    all_graph_bytes = sum(f.bytes for name, f in manifest.files.items() if name.endswith((".onnx", ".bin")))
    assert summary.dense_bytes + summary.expert_bytes == all_graph_bytes
    # Routed experts only: gate and up [16, 48], down [48, 16], float32, plus graphs and padding.
    # Counting the shared experts or dense MLPs as expert bytes would add always_run on top.
    expert_weight_bytes = len(manifest.experts) * 3 * 16 * 48 * 4
    assert expert_weight_bytes < summary.expert_bytes < expert_weight_bytes + always_run


def test_budget_counts_routed_experts_only(qwen2_export):
    bundle, _ = qwen2_export
    manifest = load_manifest(bundle)
    largest = max(e.resident_bytes for e in manifest.experts)

    # top-3 of the routed experts; a shared expert would add its own bytes on top.
    assert manifest.min_expert_budget == 3 * largest
    assert manifest.expert_bytes == sum(e.resident_bytes for e in manifest.experts)

    engine = Engine(bundle, EngineOptions(budget_bytes=manifest.min_expert_budget))
    cache = engine.new_cache()
    engine.forward(np.arange(1, 9), cache)
    engine.forward(np.array([5]), cache)
    assert {layer for layer, _ in engine.store.resident_keys()} <= {1, 5}
    assert engine.store.stats.peak_resident_bytes <= manifest.min_expert_budget


def test_dense_layer_expert_lookup_raises(qwen2_export):
    manifest = load_manifest(qwen2_export[0])

    assert manifest.expert(5, QWEN2_EXPERTS - 1).layer == 5
    with pytest.raises(BundleError, match="no expert 0 in layer 0"):
        manifest.expert(0, 0)
    with pytest.raises(BundleError, match=f"no expert {QWEN2_EXPERTS} in layer 1"):
        manifest.expert(1, QWEN2_EXPERTS)


def test_manifest_dense_layer_experts_rejected(qwen2_export, tmp_path):
    source, _ = qwen2_export
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    raw["config"]["moe_layers"][1] = False
    path.write_text(json.dumps(raw))

    with pytest.raises(BundleError, match="20 experts listed, expected 10"):
        load_manifest(bundle)


def test_decoder_sparse_step_zero_rejected(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy(QWEN2)
    config = json.loads((checkpoint / "config.json").read_text())
    config["decoder_sparse_step"] = 0
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnsupportedConfigError, match="decoder_sparse_step 0 is invalid: it must be 1 or more"):
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)


def test_all_dense_layers_rejected(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy(QWEN2)
    config = json.loads((checkpoint / "config.json").read_text())
    config["mlp_only_layers"] = [1, 3, 5]
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnsupportedConfigError, match="no layer of this qwen2_moe checkpoint is an MoE layer"):
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)


# Granite-MoE: fused experts and top-k before the softmax


def test_topk_softmax_hand_computed():
    logits = np.array([[1.0, 3.0, 2.0, 0.0],
                       [0.5, 0.5, 0.5, -1.0]], np.float32)

    weights, indices = route_topk_softmax(logits, 2, normalize=False)

    assert indices.tolist() == [[1, 2], [0, 1]]
    e = math.e
    np.testing.assert_allclose(weights[0], [e / (e + 1), 1 / (e + 1)], rtol=1e-6)
    np.testing.assert_allclose(weights[1], [0.5, 0.5], rtol=1e-6)
    assert weights.dtype == np.float32


def test_topk_softmax_equals_renormalised():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 6)).astype(np.float32) * 3

    weights, indices = route_topk_softmax(logits, 3, normalize=False)
    expected_weights, expected_indices = route_softmax_topk(logits, 3, normalize=True)

    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)


def test_granite_expert_shape_mismatch_named(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy("tiny-granitemoe")
    config = json.loads((checkpoint / "config.json").read_text())
    config["intermediate_size"] = 20
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError) as error:
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)

    message = str(error.value)
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in message
    assert "[6, 48, 48]" in message
    assert "[6, 40, 48]" in message
    assert not (tmp_path / "out").exists()


def test_granite_manifest_routing(bundle_path):
    manifest = load_manifest(bundle_path("tiny-granitemoe"))

    assert manifest.config.routing == "topk_softmax"
    assert manifest.config.residual_multiplier == 1.5
    assert manifest.config.moe_layers == [True, True]
    assert len(manifest.experts) == 2 * 6
