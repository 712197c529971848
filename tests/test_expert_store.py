"""The expert store keeps resident experts within the byte budget without changing the output.

Invariants checked:
- A greedy 64-token generation of the demo model with a 25 % budget equals the run with all
  experts resident. Its peak resident bytes stay within the budget, and it evicts experts.
- The smallest budget the manifest allows (`min_expert_budget`) still generates the same text.
- A budget below `min_expert_budget` raises BudgetTooSmallError naming the minimum. A budget
  of 0 bytes given to the engine directly raises it too.
- After every acquire and release, resident bytes are within the budget and equal the sum of
  the resident experts' sizes.
- LRU evicts the least recently used unpinned expert and never a pinned one. When the pinned
  experts leave no room for one more, acquire raises BudgetTooSmallError.
"""

from __future__ import annotations

import pytest

from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.eviction import LRUPolicy
from edgemoe.runtime.expert_store import BudgetTooSmallError, ExpertStore
from edgemoe.runtime.generation import Generator
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.sampling import SamplingParams
from edgemoe.runtime.tokenizer import BundleTokenizer

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
GREEDY = SamplingParams(temperature=0.0)


def make_generator(bundle, budget_bytes: int | None) -> Generator:
    engine = Engine(bundle, EngineOptions(budget_bytes=budget_bytes))
    return Generator(engine, BundleTokenizer(bundle, engine.manifest))


def generate_greedy(generator: Generator, max_tokens: int):
    prompt_ids = generator.tokenizer.encode(PROMPT)
    return generator.generate(prompt_ids, max_tokens, GREEDY)


@pytest.fixture(scope="module")
def unlimited_result(demo_bundle):
    return generate_greedy(make_generator(demo_bundle, None), 64)


def test_quarter_budget_same_tokens(demo_bundle, unlimited_result):
    budget = load_manifest(demo_bundle).expert_bytes // 4
    generator = make_generator(demo_bundle, budget)

    result = generate_greedy(generator, 64)

    assert result.token_ids == unlimited_result.token_ids
    assert result.text == unlimited_result.text
    assert generator.engine.store.stats.peak_resident_bytes <= budget
    assert result.stats.peak_resident_expert_bytes <= budget
    assert generator.engine.store.stats.evictions > 0


def test_minimum_budget_same_tokens(demo_bundle, unlimited_result):
    budget = load_manifest(demo_bundle).min_expert_budget
    result = generate_greedy(make_generator(demo_bundle, budget), 64)

    assert result.token_ids == unlimited_result.token_ids


def test_budget_below_minimum_rejected(demo_bundle):
    minimum = load_manifest(demo_bundle).min_expert_budget

    with pytest.raises(BudgetTooSmallError) as error:
        Engine(demo_bundle, EngineOptions(budget_bytes=minimum - 1))

    assert str(minimum) in str(error.value)


def test_zero_budget_rejected(tiny_bundle):
    with pytest.raises(BudgetTooSmallError):
        Engine(tiny_bundle, EngineOptions(budget_bytes=0))


def test_budget_invariant_every_change(demo_bundle):
    manifest = load_manifest(demo_bundle)
    budget = manifest.min_expert_budget
    generator = make_generator(demo_bundle, budget)
    store = generator.engine.store
    violations: list[str] = []
    changes = 0

    def check(event: str) -> None:
        nonlocal changes
        changes += 1
        # Resident and in-flight experts, read together: the I/O thread changes them concurrently.
        used, resident, inflight = store.snapshot()
        accounted = sum(manifest.expert(layer, index).resident_bytes for layer, index in resident + inflight)
        if used > budget:
            violations.append(f"{event}: resident + in flight {used} > budget {budget}")
        if used != accounted:
            violations.append(f"{event}: resident + in flight {used} != sum of experts {accounted}")

    acquire, release = store.acquire, store.release

    def checked_acquire(layer: int, index: int):
        session = acquire(layer, index)
        check(f"acquire {(layer, index)}")
        return session

    def checked_release(layer: int, index: int) -> None:
        release(layer, index)
        check(f"release {(layer, index)}")

    store.acquire, store.release = checked_acquire, checked_release
    generate_greedy(generator, 96)

    assert violations == []
    assert changes > 1000
    assert store.stats.evictions > 0


@pytest.fixture
def three_expert_store(tiny_bundle) -> ExpertStore:
    """Expert store of tiny-mixtral with room for exactly three of layer 0's experts."""
    manifest = load_manifest(tiny_bundle)
    sizes = [manifest.expert(0, index).resident_bytes for index in range(5)]
    budget = 3 * max(sizes)
    assert 4 * min(sizes) > budget, "test setup: a fourth expert must not fit"
    assert budget >= manifest.min_expert_budget, "test setup: budget below the manifest minimum"
    return ExpertStore(tiny_bundle, manifest, budget)


def touch(store: ExpertStore, layer: int, index: int) -> None:
    store.acquire(layer, index)
    store.release(layer, index)


def test_lru_evicts_least_recent(three_expert_store):
    store = three_expert_store
    for index in (0, 1, 2):
        touch(store, 0, index)
    touch(store, 0, 0)  # expert 1 is now the least recently used

    touch(store, 0, 3)
    assert set(store.resident_keys()) == {(0, 0), (0, 2), (0, 3)}

    touch(store, 0, 2)  # expert 0 is now the least recently used
    touch(store, 0, 4)
    assert set(store.resident_keys()) == {(0, 2), (0, 3), (0, 4)}

    assert store.stats.evictions == 2
    assert store.stats.hits == 2
    assert store.stats.misses == 5


def test_lru_keeps_pinned_expert(three_expert_store):
    store = three_expert_store
    store.acquire(0, 0)  # pinned: least recently used but in use
    touch(store, 0, 1)
    touch(store, 0, 2)

    touch(store, 0, 3)

    assert set(store.resident_keys()) == {(0, 0), (0, 2), (0, 3)}


def test_all_pinned_raises(three_expert_store):
    store = three_expert_store
    for index in (0, 1, 2):
        store.acquire(0, index)

    with pytest.raises(BudgetTooSmallError):
        store.acquire(0, 3)

    assert set(store.resident_keys()) == {(0, 0), (0, 1), (0, 2)}


def test_clear_drops_unpinned(three_expert_store):
    store = three_expert_store
    store.acquire(0, 0)
    touch(store, 0, 1)

    store.clear()

    assert store.resident_keys() == [(0, 0)]
    assert store.resident_bytes == store.manifest.expert(0, 0).resident_bytes


def test_lru_policy_order():
    policy = LRUPolicy()
    for key in [(0, 0), (0, 1), (1, 0)]:
        policy.on_insert(key)
    policy.on_access((0, 0))

    assert policy.choose_victim([(0, 0), (0, 1), (1, 0)]) == (0, 1)
    assert policy.choose_victim([(0, 0), (1, 0)]) == (1, 0)
    assert policy.choose_victim([]) is None
