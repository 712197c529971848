"""PhiMoE export: sparsemixer routing, LongRoPE's context cap and the configs it rejects.

Invariants checked:
- sparsemixer matches hand-computed weights: the chosen expert's share of a softmax over the
  experts within 2 * jitter_eps relative gap of the best remaining logit, the lower index first
  on ties. It picks the top-2 logits, so predictors that rank router logits stay valid.
- A LongRoPE bundle records sparsemixer with its jitter_eps, and its context is capped at
  original_max_position_embeddings. Without LongRoPE the sliding window caps it.
- num_experts_per_tok other than 2, other rope types, partial rotary factors and malformed
  short_factor lists are rejected at export, naming the field and value.
- A manifest whose routing_params the routing method does not take is rejected at load.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from edgemoe.export.architectures import UnsupportedConfigError
from edgemoe.export.writer import export_checkpoint
from edgemoe.runtime.engine import ContextLengthError, Engine
from edgemoe.runtime.manifest import BundleError, load_manifest
from edgemoe.runtime.routing import route_sparsemixer, route_topk_softmax

PHIMOE = "tiny-phimoe"


def edit_config(checkpoint, **changes) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# Routing


def test_sparsemixer_hand_computed():
    logits = np.array([[2.0, 1.9, 1.0, -3.0],
                       [-1.0, -1.05, -4.0, -1.02],
                       [0.5, 0.5, 0.5, 0.0]], np.float32)

    weights, indices = route_sparsemixer(logits, 2, normalize=False, jitter_eps=0.05)

    # Row 0: expert 1 is within 0.1 of 2.0 relative to 2.0, expert 2 is not. The second step
    # measures gaps from 1.9, which leaves expert 1 alone.
    # Row 1: all logits are negative, so each gap is relative to |logit|; expert 2 is out.
    # Row 2: a three-way tie picks experts 0 then 1, and expert 3 is out in both steps.
    assert indices.tolist() == [[0, 1], [0, 3], [0, 1]]
    expected = [[1 / (1 + math.exp(-0.1)), 1.0],
                [1 / (1 + math.exp(-0.05) + math.exp(-0.02)), 1 / (1 + math.exp(-0.03))],
                [1 / 3, 1 / 2]]
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    assert weights.dtype == np.float32


def test_sparsemixer_small_eps_gives_weight_one():
    logits = np.array([[2.0, 1.9, 1.0, -3.0]], np.float32)

    weights, indices = route_sparsemixer(logits, 2, normalize=False, jitter_eps=0.01)

    assert indices.tolist() == [[0, 1]]
    np.testing.assert_array_equal(weights, [[1.0, 1.0]])


def test_sparsemixer_picks_top2_logits():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(256, 16)) * 3).astype(np.float32)

    weights, indices = route_sparsemixer(logits, 2, normalize=False, jitter_eps=0.1)
    _, top2 = route_topk_softmax(logits, 2, normalize=False)

    np.testing.assert_array_equal(indices, top2)
    assert np.all((weights > 0) & (weights <= 1))


# Export


def test_manifest_records_sparsemixer(bundle_path):
    manifest = load_manifest(bundle_path(PHIMOE))

    assert manifest.config.routing == "sparsemixer"
    assert manifest.config.routing_params == {"jitter_eps": 0.1}
    assert manifest.config.num_experts_per_tok == 2
    assert len(manifest.experts) == 3 * 6


def test_longrope_caps_context(bundle_path):
    engine = Engine(bundle_path(PHIMOE))

    # original_max_position_embeddings is 64; max_position_embeddings 256, sliding_window 96.
    assert engine.context_length == 64
    with pytest.raises(ContextLengthError, match="65 tokens exceed the model's context window of 64"):
        engine.forward(np.zeros(65, np.int64), engine.new_cache())


def test_default_rope_keeps_window_cap(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy(PHIMOE)
    edit_config(checkpoint, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

    export_checkpoint(checkpoint, tmp_path / "out", progress=False)

    assert load_manifest(tmp_path / "out").config.max_position_embeddings == 96


@pytest.mark.parametrize("changes, message", [
    ({"num_experts_per_tok": 1}, "num_experts_per_tok 1 is not supported for phimoe"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}},
     "rope_type 'yarn' is not supported for phimoe; edgemoe exports rope_type default and longrope"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported for phimoe"),
], ids=["top-k", "rope-type", "partial-rotary"])
def test_unsupported_config_rejected(checkpoint_copy, tmp_path, changes, message):
    checkpoint = checkpoint_copy(PHIMOE)
    edit_config(checkpoint, **changes)

    with pytest.raises(UnsupportedConfigError, match=message):
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_short_factor_length_rejected(checkpoint_copy, tmp_path):
    checkpoint = checkpoint_copy(PHIMOE)
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_parameters"]["short_factor"] = [1.0, 1.0]
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnsupportedConfigError, match=r"must be a list of 4 numbers \(head_dim 8 / 2\)"):
        export_checkpoint(checkpoint, tmp_path / "out", progress=False)


# Runtime


def test_unknown_routing_param_rejected(bundle_path, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_path(PHIMOE), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["config"]["routing_params"] = {"jitter": 0.1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="routing_params jitter are not parameters of routing 'sparsemixer'"):
        load_manifest(bundle)
