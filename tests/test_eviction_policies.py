"""Eviction policies choose the victims computed by hand.

Invariants checked:
- LFU evicts the least used expert. An insert counts as a use, and ties go to the least
  recently used.
- EdgeMoE keeps keep(e) = f(e) / (1 + d(e)) with d(e) = (layer(e) - current layer) mod L and
  evicts the lowest score. With a profile, f is the profile's share. For equal frequencies the
  current layer scores highest and the layer that just ran is evicted first. Without a profile,
  f is the counted uses plus one.
- The expert store evicts what its policy chooses (LFU and EdgeMoE with a profile).
- make_policy builds each policy by name, and an unknown name raises ValueError listing the
  choices.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.runtime.eviction import POLICIES, EdgeMoEPolicy, LFUPolicy, LRUPolicy, make_policy
from edgemoe.runtime.expert_store import ExpertStore
from edgemoe.runtime.manifest import load_manifest

A, B, C = (0, 0), (0, 1), (1, 0)

# [layer, expert] activation shares of a 4-layer, 2-expert model, for the EdgeMoE cases.
FREQUENCIES = np.array([[0.50, 0.50],
                        [0.90, 0.10],
                        [0.60, 0.40],
                        [0.70, 0.30]])


def insert_all(policy, keys) -> None:
    for key in keys:
        policy.on_insert(key)


def eviction_order(policy, keys) -> list:
    """Victims in the order the policy picks them when every key has to go."""
    remaining, order = list(keys), []
    while remaining:
        victim = policy.choose_victim(remaining)
        order.append(victim)
        remaining.remove(victim)
        policy.on_remove(victim)
    return order


# LFU


def test_lfu_evicts_least_used():
    policy = LFUPolicy()
    insert_all(policy, [A, B, C])
    for key in (A, A, B):
        policy.on_access(key)  # uses: A 3, B 2, C 1 (the insert counts)

    assert policy.choose_victim([A, B, C]) == C
    assert policy.choose_victim([A, B]) == B


def test_lfu_frequency_beats_recency():
    policy = LFUPolicy()
    policy.on_insert(A)
    policy.on_access(A)
    policy.on_insert(B)  # the most recent, but used once against A's twice

    assert policy.choose_victim([A, B]) == B


def test_lfu_tie_evicts_least_recent():
    policy = LFUPolicy()
    insert_all(policy, [A, B, C])
    for key in (C, A, B):
        policy.on_access(key)  # 2 uses each, least recent first: C, A, B
    assert policy.choose_victim([A, B, C]) == C

    policy.on_access(C)  # C has 3 uses now, so A and B tie and A is less recent

    assert policy.choose_victim([A, B, C]) == A


def test_lfu_no_candidates():
    policy = LFUPolicy()
    policy.on_insert(A)

    assert policy.choose_victim([]) is None


# EdgeMoE


def test_edgemoe_keep_scores_from_profile():
    policy = EdgeMoEPolicy(num_layers=4, frequencies=FREQUENCIES)
    policy.on_layer(2)

    # d = (layer - 2) mod 4: layer 2 -> 0, layer 3 -> 1, layer 0 -> 2, layer 1 -> 3
    expected = {(2, 0): 0.60 / 1, (2, 1): 0.40 / 1, (3, 0): 0.70 / 2, (3, 1): 0.30 / 2,
                (0, 0): 0.50 / 3, (0, 1): 0.50 / 3, (1, 0): 0.90 / 4, (1, 1): 0.10 / 4}
    for key, score in expected.items():
        assert policy.keep_score(key) == pytest.approx(score), key


def test_edgemoe_evicts_lowest_keep_score():
    policy = EdgeMoEPolicy(num_layers=4, frequencies=FREQUENCIES)
    keys = [(layer, index) for layer in range(4) for index in range(2)]
    insert_all(policy, keys)
    policy.on_layer(2)

    # Scores 0.025, 0.15, 0.167, 0.167, 0.225, 0.35, 0.4, 0.6. (0, 0) and (0, 1) tie, and
    # (0, 0) was inserted first.
    assert eviction_order(policy, keys) == [(1, 1), (3, 1), (0, 0), (0, 1), (1, 0), (3, 0), (2, 1), (2, 0)]


@pytest.mark.parametrize("current", range(4))
def test_edgemoe_current_layer_kept_longest(current):
    policy = EdgeMoEPolicy(num_layers=4, frequencies=np.full((4, 1), 0.25))
    keys = [(layer, 0) for layer in range(4)]
    insert_all(policy, keys)
    policy.on_layer(current)

    scores = {key: policy.keep_score(key) for key in keys}

    assert max(scores, key=scores.get) == (current, 0)
    # The layer that just ran comes again after all the others, so it goes first.
    assert policy.choose_victim(keys) == ((current - 1) % 4, 0)
    assert eviction_order(policy, keys)[-1] == (current, 0)


def test_edgemoe_without_profile_counts_uses_plus_one():
    policy = EdgeMoEPolicy(num_layers=4)
    keys = [(0, 0), (1, 0), (2, 0)]
    insert_all(policy, keys)
    for _ in range(3):
        policy.on_access((0, 0))
    policy.on_access((2, 0))
    policy.on_layer(0)

    assert policy.keep_score((0, 0)) == pytest.approx((3 + 1) / (1 + 0))
    assert policy.keep_score((1, 0)) == pytest.approx((0 + 1) / (1 + 1))
    assert policy.keep_score((2, 0)) == pytest.approx((1 + 1) / (1 + 2))
    assert policy.choose_victim(keys) == (1, 0)
    assert policy.choose_victim([(0, 0), (2, 0)]) == (2, 0)


def test_edgemoe_profile_ignores_uses():
    policy = EdgeMoEPolicy(num_layers=4, frequencies=FREQUENCIES)
    insert_all(policy, [(1, 1), (1, 0)])
    for _ in range(10):
        policy.on_access((1, 1))
    policy.on_layer(0)

    assert policy.choose_victim([(1, 1), (1, 0)]) == (1, 1)


# Policies inside the expert store


@pytest.fixture
def three_expert_budget(tiny_bundle) -> int:
    """Budget of tiny-mixtral that fits exactly three of its experts."""
    manifest = load_manifest(tiny_bundle)
    sizes = [manifest.expert(layer, index).resident_bytes
             for layer in range(manifest.config.num_hidden_layers) for index in range(manifest.config.num_experts)]
    budget = 3 * max(sizes)
    assert 4 * min(sizes) > budget, "test setup: a fourth expert must not fit"
    assert budget >= manifest.min_expert_budget, "test setup: budget below the manifest minimum"
    return budget


def touch(store: ExpertStore, key, times: int = 1) -> None:
    for _ in range(times):
        store.acquire(*key)
        store.release(*key)


def test_store_lfu_evicts_least_used(tiny_bundle, three_expert_budget):
    store = ExpertStore(tiny_bundle, load_manifest(tiny_bundle), three_expert_budget, policy=LFUPolicy())
    touch(store, (0, 0), 3)
    touch(store, (0, 1), 1)
    touch(store, (0, 2), 2)

    touch(store, (0, 3))

    assert set(store.resident_keys()) == {(0, 0), (0, 2), (0, 3)}
    assert store.stats.evictions == 1


def test_store_edgemoe_evicts_lowest_score(tiny_bundle, three_expert_budget):
    frequencies = np.zeros((2, 6))
    frequencies[0, :3] = [0.40, 0.20, 0.40]
    frequencies[1, :3] = [0.15, 0.50, 0.35]
    policy = EdgeMoEPolicy(num_layers=2, frequencies=frequencies)
    store = ExpertStore(tiny_bundle, load_manifest(tiny_bundle), three_expert_budget, policy=policy)
    store.begin_layer(1, set())
    for key in [(0, 0), (0, 1), (1, 0)]:
        touch(store, key)

    # Layer 1 runs: keep (0, 0) = 0.4 / 2, (0, 1) = 0.2 / 2, (1, 0) = 0.15 / 1.
    touch(store, (1, 1))

    assert set(store.resident_keys()) == {(0, 0), (1, 0), (1, 1)}


# make_policy


@pytest.mark.parametrize("name, policy_type", [("lru", LRUPolicy), ("lfu", LFUPolicy), ("edgemoe", EdgeMoEPolicy)])
def test_make_policy_by_name(name, policy_type):
    policy = make_policy(name, num_layers=4, frequencies=FREQUENCIES)

    assert type(policy) is policy_type
    assert policy.name == name


def test_make_policy_passes_profile():
    policy = make_policy("edgemoe", num_layers=4, frequencies=FREQUENCIES)

    assert policy.num_layers == 4
    assert policy.frequencies is FREQUENCIES


def test_make_policy_unknown_name():
    with pytest.raises(ValueError) as error:
        make_policy("mru", num_layers=4)

    message = str(error.value)
    assert "'mru'" in message
    for name in POLICIES:
        assert name in message
