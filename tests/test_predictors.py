"""Routing profiles, expert predictors and their recall.

Invariants checked:
- `edgemoe profile --json` on a copy of the demo bundle with the held-out TinyStories text
  writes routing_profile.npz, lists it in manifest.json with its size and sha256, and the
  bundle still loads with verification. The engine starts from the profile, and the edgemoe
  eviction policy uses its shares.
- The recorded counts of each layer sum to tokens x top-k, the transitions between two layers
  to tokens x top-k x top-k, and tokens equals the tokens of the text's windows.
- The online recall of each predictor on the demo model is above a floor set a little below
  the measured value; combined >= table and lookahead >= frequency. The plain output of
  `edgemoe profile` prints each predictor's recall.
- RoutingStats records hand-made choices as expected and survives save/load unchanged.
- Frequency, table, look-ahead and combined predictors give the scores and rankings computed by
  hand; ties rank the lower expert index first.
- RecallMeter counts a chosen expert as a hit when it was among the predicted ones.
- make_predictor raises ValueError listing the predictors for an unknown name.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from conftest import checkpoint_dir

from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.evaluate import split_windows
from edgemoe.runtime.loading import load_model
from edgemoe.runtime.manifest import load_manifest, sha256_file, verify_file
from edgemoe.runtime.predictors import (PREDICTORS, CombinedPredictor, FrequencyPredictor, LookaheadPredictor,
                                        RecallMeter, TablePredictor, make_predictor, top_experts)
from edgemoe.runtime.routing_profile import PROFILE_NAME, RoutingStats
from edgemoe.runtime.tokenizer import BundleTokenizer

PROFILE_WINDOW = 256  # the default window of `edgemoe profile` on the demo model (context 512)

# Online recall floors on the demo model over tests/fixtures/tinystories-eval.txt. Measured with
# `edgemoe profile --json` (onnxruntime CPU, x86_64): frequency 0.315, table 0.469,
# lookahead 0.686, combined 0.702.
RECALL_FLOORS = {"frequency": 0.29, "table": 0.44, "lookahead": 0.65, "combined": 0.67}


# `edgemoe profile`


@pytest.fixture(scope="module")
def profiled_demo(demo_bundle, corpus_path, run_cli, tmp_path_factory):
    """A demo bundle copy after `edgemoe profile --json`: (bundle, printed summary)."""
    bundle = tmp_path_factory.mktemp("profiled") / "demo"
    shutil.copytree(demo_bundle, bundle)
    completed = run_cli(["profile", bundle, "--text", corpus_path, "--json"])
    assert completed.returncode == 0, completed.stderr
    return bundle, json.loads(completed.stdout)


def test_profile_writes_file(profiled_demo):
    bundle, _ = profiled_demo

    assert (bundle / PROFILE_NAME).is_file()


def test_profile_listed_in_manifest(profiled_demo, corpus_path):
    bundle, summary = profiled_demo
    manifest = load_manifest(bundle)
    entry = manifest.files[PROFILE_NAME]

    assert entry.sha256 == sha256_file(bundle / PROFILE_NAME)
    assert entry.bytes == (bundle / PROFILE_NAME).stat().st_size
    assert manifest.routing_profile["file"] == PROFILE_NAME
    assert manifest.routing_profile["tokens"] == summary["tokens"]
    assert manifest.routing_profile["source"] == str(corpus_path)


def test_profiled_bundle_loads_verified(profiled_demo):
    bundle, summary = profiled_demo
    manifest = load_manifest(bundle)

    verify_file(bundle, manifest, PROFILE_NAME)
    model = load_model(bundle, verify=True, eviction="edgemoe", preload=False)

    assert model.engine.routing.tokens == summary["tokens"]
    assert np.array_equal(model.engine.store.policy.frequencies, RoutingStats.load(bundle, manifest).shares())


def test_profile_counts_sum(profiled_demo):
    bundle, summary = profiled_demo
    manifest = load_manifest(bundle)
    stats = RoutingStats.load(bundle, manifest)
    layers, top_k = manifest.config.num_hidden_layers, manifest.config.num_experts_per_tok

    assert stats.tokens == summary["tokens"]
    assert stats.counts.shape == (layers, manifest.config.num_experts)
    assert stats.counts.sum() == stats.tokens * layers * top_k
    assert stats.counts.sum(axis=1).tolist() == [stats.tokens * top_k] * layers
    assert stats.transitions.sum(axis=(1, 2)).tolist() == [stats.tokens * top_k * top_k] * (layers - 1)


def test_profile_tokens_are_corpus_windows(profiled_demo, corpus_path):
    bundle, summary = profiled_demo
    tokenizer = BundleTokenizer(bundle, load_manifest(bundle))
    ids = tokenizer.encode(corpus_path.read_text(encoding="utf-8"), add_special_tokens=False)
    windows = split_windows(ids, PROFILE_WINDOW)

    assert summary["windows"] == len(windows)
    assert summary["tokens"] == sum(len(window) for window in windows)


@pytest.mark.parametrize("predictor", list(RECALL_FLOORS))
def test_recall_floor(profiled_demo, predictor):
    _, summary = profiled_demo
    recall = summary["recall"][predictor]

    assert recall["overall"] >= RECALL_FLOORS[predictor]
    assert recall["per_layer"][0] is None  # layer 0 has no previous layer to predict from


def test_recall_ordering(profiled_demo):
    recall = {name: value["overall"] for name, value in profiled_demo[1]["recall"].items()}

    assert recall["combined"] >= recall["table"]
    assert recall["lookahead"] >= recall["frequency"]


def test_profile_prints_recall(tiny_bundle, corpus_path, run_cli, tmp_path):
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    text = tmp_path / "calibration.txt"
    text.write_text(corpus_path.read_text(encoding="utf-8")[:3000], encoding="utf-8")

    completed = run_cli(["profile", bundle, "--text", text])

    assert completed.returncode == 0, completed.stderr
    assert "online recall" in completed.stdout
    for name in PREDICTORS:
        assert re.search(rf"\b{name} [01]\.\d{{3}}\b", completed.stdout), name
    assert (bundle / PROFILE_NAME).is_file()


# RoutingStats


def hand_stats() -> RoutingStats:
    """Two tokens through 2 layers of 6 experts, 3 per token."""
    stats = RoutingStats(num_layers=2, num_experts=6)
    first = np.array([[0, 1, 2], [3, 4, 5]])
    second = np.array([[1, 2, 3], [0, 4, 5]])
    stats.record(0, first, None)
    stats.record(1, second, first)
    return stats


def test_routing_stats_record():
    stats = hand_stats()

    assert stats.tokens == 2
    assert stats.counts[0].tolist() == [1, 1, 1, 1, 1, 1]
    assert stats.counts[1].tolist() == [1, 1, 1, 1, 1, 1]
    # Each token adds every (previous expert, expert) pair once: 2 tokens x 3 x 3.
    assert stats.transitions.sum() == 18
    assert stats.transitions[0, 0].tolist() == [0, 1, 1, 1, 0, 0]
    assert stats.transitions[0, 3].tolist() == [1, 0, 0, 0, 1, 1]


def test_routing_stats_round_trip(tiny_bundle, tmp_path):
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    stats = hand_stats()

    stats.save(bundle, load_manifest(bundle), source="hand-made")
    manifest = load_manifest(bundle)
    loaded = RoutingStats.load(bundle, manifest)

    assert np.array_equal(loaded.counts, stats.counts)
    assert np.array_equal(loaded.transitions, stats.transitions)
    assert loaded.tokens == stats.tokens
    assert manifest.routing_profile == {"file": PROFILE_NAME, "tokens": 2, "source": "hand-made"}
    verify_file(bundle, manifest, PROFILE_NAME)


def test_routing_stats_load_without_profile(tiny_bundle):
    assert RoutingStats.load(tiny_bundle, load_manifest(tiny_bundle)) is None


# Predictors


def hand_table_stats() -> RoutingStats:
    """Transitions from layer 0 to layer 1 of a 3-expert model, rows p, columns e."""
    stats = RoutingStats(num_layers=2, num_experts=3)
    stats.transitions[0] = [[0, 3, 1],   # P(e | p=0) = 0, 0.75, 0.25
                            [2, 0, 2],   # P(e | p=1) = 0.5, 0, 0.5
                            [0, 0, 0]]   # no data: uniform
    return stats


def test_table_predictor_scores():
    predictor = TablePredictor(hand_table_stats())
    previous = np.array([[0, 1], [1, 2]])

    scores = predictor.scores(1, previous, None)

    third = 1 / 3
    assert scores == pytest.approx(np.array([[0.25, 0.375, 0.375],
                                             [(0.5 + third) / 2, third / 2, (0.5 + third) / 2]]))


def test_table_predictor_ranking():
    predictor = TablePredictor(hand_table_stats())
    previous = np.array([[0, 1], [1, 2], [0, 2]])

    ranking = top_experts(predictor.scores(1, previous, None), 3)

    # Equal scores rank the lower expert index first.
    assert ranking.tolist() == [[1, 2, 0], [0, 2, 1], [1, 2, 0]]


def test_frequency_predictor_ranking():
    stats = RoutingStats(num_layers=2, num_experts=3)
    stats.counts[1] = [1, 5, 4]
    predictor = FrequencyPredictor(stats)

    scores = predictor.scores(1, np.array([[0, 1], [2, 0]]), None)

    assert scores == pytest.approx(np.array([[0.1, 0.5, 0.4], [0.1, 0.5, 0.4]]))
    assert top_experts(scores, 2).tolist() == [[1, 2], [1, 2]]


def test_frequency_predictor_uniform_without_data():
    predictor = FrequencyPredictor(RoutingStats(num_layers=2, num_experts=4))

    scores = predictor.scores(1, np.array([[0, 1]]), None)

    assert scores.tolist() == [[0.25, 0.25, 0.25, 0.25]]


def test_lookahead_predictor_ranks_by_logits():
    predictor = LookaheadPredictor(RoutingStats(num_layers=2, num_experts=4))
    logits = np.array([[0.5, 2.0, -1.0, 1.0]], dtype=np.float32)

    scores = predictor.scores(1, np.array([[0, 1]]), logits)

    assert scores.sum() == pytest.approx(1.0)
    assert scores[0, 1] / scores[0, 3] == pytest.approx(np.e)
    assert top_experts(scores, 4).tolist() == [[1, 3, 0, 2]]


def test_combined_default_weight():
    predictor = CombinedPredictor(hand_table_stats())
    previous = np.array([[0, 1]])
    logits = np.array([[0.0, 0.0, np.log(2.0)]])

    scores = predictor.scores(1, previous, logits)

    lookahead = np.array([0.25, 0.25, 0.5])
    table = np.array([0.25, 0.375, 0.375])
    assert predictor.lookahead_weight(1) == 0.7
    assert scores[0] == pytest.approx(0.7 * lookahead + 0.3 * table)


def test_combined_weight_follows_recall():
    predictor = CombinedPredictor(hand_table_stats())
    predictor.meters = {"lookahead": RecallMeter(2), "table": RecallMeter(2)}
    predictor.meters["lookahead"].hits[1], predictor.meters["lookahead"].total[1] = 60, 100
    predictor.meters["table"].hits[1], predictor.meters["table"].total[1] = 20, 100

    # 60^2 / (60^2 + 20^2)
    assert predictor.lookahead_weight(1) == pytest.approx(0.9)


def test_combined_weight_default_until_64_choices():
    predictor = CombinedPredictor(hand_table_stats())
    predictor.meters = {"lookahead": RecallMeter(2), "table": RecallMeter(2)}
    predictor.meters["lookahead"].hits[1], predictor.meters["lookahead"].total[1] = 60, 63

    assert predictor.lookahead_weight(1) == 0.7


def test_make_predictor_by_name():
    stats = RoutingStats(num_layers=2, num_experts=3)

    for name, predictor_type in PREDICTORS.items():
        assert type(make_predictor(name, stats)) is predictor_type


def test_make_predictor_unknown_name():
    with pytest.raises(ValueError) as error:
        make_predictor("oracle", RoutingStats(num_layers=2, num_experts=3))

    message = str(error.value)
    assert "'oracle'" in message
    for name in PREDICTORS:
        assert name in message


def test_engine_unknown_predictor(tiny_bundle):
    with pytest.raises(ValueError) as error:
        Engine(tiny_bundle, EngineOptions(predictor="oracle"))

    assert "auto" in str(error.value)
    assert "combined" in str(error.value)


# RecallMeter


def test_recall_meter_hand_case():
    meter = RecallMeter(num_layers=3)

    # Token 0 chose 1 (predicted) and 4 (not); token 1 chose 2 and 3, both predicted.
    meter.record(1, predicted=np.array([[0, 1], [2, 3]]), actual=np.array([[1, 4], [2, 3]]))
    meter.record(2, predicted=np.array([[0, 1]]), actual=np.array([[5, 6]]))

    assert meter.hits.tolist() == [0, 3, 0]
    assert meter.total.tolist() == [0, 4, 2]
    assert meter.summary() == {"overall": 0.5, "per_layer": [None, 0.75, 0.0]}


def test_recall_meter_empty():
    assert RecallMeter(num_layers=2).summary() == {"overall": None, "per_layer": [None, None]}


def test_profile_rejects_tiny_text(demo_bundle, tmp_path, run_cli):
    bundle = tmp_path / "demo"
    shutil.copytree(demo_bundle, bundle)
    text = tmp_path / "tiny.txt"
    text.write_text("hi")

    completed = run_cli(["profile", bundle, "--text", text])

    assert completed.returncode == 1
    assert "at least 256" in completed.stderr


def test_export_profile_text_checked_first(tmp_path, run_cli):
    out = tmp_path / "bundle"

    completed = run_cli(["export", checkpoint_dir("tiny-mixtral"), out, "--profile-text", tmp_path / "absent.txt"])

    assert completed.returncode == 1
    assert "--profile-text" in completed.stderr
    assert not out.exists()
