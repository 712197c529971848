"""Preloading experts on the I/O thread changes speed only, never the output or the budget.

Invariants checked:
- Greedy 64 tokens and the prefill logits of a prompt (np.array_equal) of the demo model equal
  those of a run with every expert resident and no preloading. This is so with preloading on
  for every eviction policy and predictor, and with preloading off for every policy, each at a
  25 % budget and at the minimum budget. It also holds in the on-demand mode
  (keep_only_current_layer) and with every expert loaded up front (load_all_experts).
- A model with 3 experts per token gives the same logits with and without preloading, because
  the experts' outputs are summed in a fixed order.
- During 200 tokens with preloading 2 layers ahead, at the minimum budget and at 25 %, the
  accounted bytes equal the sum of the resident and in-flight experts' sizes and stay within
  the budget at every acquire, release and preload. The checks see in-flight experts, and the
  check flags a counter that disagrees with the experts.
- A demand for an expert that is being preloaded waits for that load: one session is created,
  counted as one in-flight hit. A preload of an expert that a demand is loading is skipped.
  A demand that waits for a failing preload raises BundleError naming the file.
- Engine.close stops the I/O thread.
- A failing preload (a corrupt expert file, or an exception raised by the store) leaves the I/O
  thread alive, and later preloads still load.
- A corrupt expert fails the generation that needs it with a BundleError naming the file and
  the sha256 mismatch. The next generation that does not need it gives the reference tokens.
  `edgemoe generate` and `edgemoe eval` end with one `edgemoe: error:` line naming the file and
  exit with status 1, without aborting while the I/O thread is loading. Only warnings that
  the I/O thread logged may come before that line.
  Over HTTP the request that needs it gets a 500 in the error shape naming the file, and the
  next request gets a 200 with the reference tokens.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Callable

import numpy as np
import pytest

from conftest import flip_byte

from edgemoe.runtime import expert_store as expert_store_module
from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.eviction import POLICIES
from edgemoe.runtime.expert_store import ExpertStore
from edgemoe.runtime.generation import Generator
from edgemoe.runtime.manifest import BundleError, load_manifest
from edgemoe.runtime.predictors import PREDICTORS
from edgemoe.runtime.sampling import SamplingParams
from edgemoe.runtime.tokenizer import BundleTokenizer
from edgemoe.server.settings import ServerSettings

pytest.register_assert_rewrite("server_helpers")
from server_helpers import assert_error_shape, run_server  # noqa: E402

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
OTHER_PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0.0)
GREEDY_TOKENS = 64
LONG_TOKENS = 200
PROBE_TOKENS = 8  # tokens generated for each prompt of the corrupt-expert tests
POLL_SECONDS = 0.01
WAIT_SECONDS = 10.0
CLI_RUNS = 3
BUDGETS = ("25%", "minimum")


def budget_bytes(bundle, name: str) -> int:
    manifest = load_manifest(bundle)
    if name == "minimum":
        return manifest.min_expert_budget
    return manifest.expert_bytes * int(name.rstrip("%")) // 100


def make_generator(bundle, **options) -> Generator:
    engine = Engine(bundle, EngineOptions(**options))
    return Generator(engine, BundleTokenizer(bundle, engine.manifest))


def greedy_and_logits(generator: Generator, max_tokens: int = GREEDY_TOKENS) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after PROMPT (EOS ignored), then the prefill logits of PROMPT from an empty cache."""
    prompt_ids = generator.tokenizer.encode(PROMPT)
    result = generator.generate(prompt_ids, max_tokens, GREEDY, ignore_eos=True)
    logits = generator.engine.forward(np.asarray(prompt_ids), generator.engine.new_cache(), all_logits=True)
    return result.token_ids, logits


@pytest.fixture(scope="module")
def reference(demo_bundle) -> tuple[list[int], np.ndarray]:
    """Tokens and logits with every expert allowed to stay resident and no I/O thread."""
    generator = make_generator(demo_bundle, predictor=None, preload=False)
    tokens, logits = greedy_and_logits(generator)
    assert len(tokens) == GREEDY_TOKENS, "test setup: the reference must have 64 tokens"
    return tokens, logits


# Same output


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("eviction", POLICIES)
@pytest.mark.parametrize("predictor", list(PREDICTORS))
def test_preloading_same_output(demo_bundle, reference, budget, eviction, predictor):
    generator = make_generator(demo_bundle, budget_bytes=budget_bytes(demo_bundle, budget), eviction=eviction,
                               predictor=predictor, preload=True)
    try:
        tokens, logits = greedy_and_logits(generator)
    finally:
        generator.engine.close()

    stats = generator.engine.store.stats
    assert tokens == reference[0]
    assert np.array_equal(logits, reference[1])
    assert stats.preloads + stats.preloads_dropped > 0, "the I/O thread was never asked to preload"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("eviction", POLICIES)
def test_no_preloading_same_output(demo_bundle, reference, budget, eviction):
    generator = make_generator(demo_bundle, budget_bytes=budget_bytes(demo_bundle, budget), eviction=eviction,
                               predictor=None, preload=False)

    tokens, logits = greedy_and_logits(generator)

    assert tokens == reference[0]
    assert np.array_equal(logits, reference[1])
    assert generator.engine.store.stats.evictions > 0


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_on_demand_same_output(demo_bundle, reference, preload):
    generator = make_generator(demo_bundle, budget_bytes=budget_bytes(demo_bundle, "25%"),
                               keep_only_current_layer=True, predictor="auto" if preload else None,
                               preload=preload)
    try:
        tokens, logits = greedy_and_logits(generator)
    finally:
        generator.engine.close()

    # Only the last layer's experts stay, plus layer 0's when the I/O thread preloaded them for
    # the next token.
    kept_layers = {generator.engine.config.num_hidden_layers - 1} | ({0} if preload else set())
    assert tokens == reference[0]
    assert np.array_equal(logits, reference[1])
    assert {layer for layer, _ in generator.engine.store.resident_keys()} <= kept_layers


def test_all_in_ram_same_output(demo_bundle, reference):
    generator = make_generator(demo_bundle, predictor=None, preload=False)
    manifest = generator.engine.manifest
    expert_count = manifest.config.num_hidden_layers * manifest.config.num_experts

    generator.engine.load_all_experts()
    tokens, logits = greedy_and_logits(generator)

    stats = generator.engine.store.stats
    assert tokens == reference[0]
    assert np.array_equal(logits, reference[1])
    assert len(generator.engine.store.resident_keys()) == expert_count
    assert stats.loads == expert_count
    assert stats.misses == 0


@pytest.mark.parametrize("budget", BUDGETS)
def test_three_experts_per_token_same_logits(tiny_bundle, budget):
    """tiny-mixtral routes each token to 3 experts, so the summation order of their outputs matters."""
    assert load_manifest(tiny_bundle).config.num_experts_per_tok == 3, "test setup: needs top-3 routing"
    prompt_ids = np.asarray(BundleTokenizer(tiny_bundle, load_manifest(tiny_bundle)).encode(PROMPT))
    plain = Engine(tiny_bundle, EngineOptions(predictor=None, preload=False))
    expected = plain.forward(prompt_ids, plain.new_cache(), all_logits=True)
    engine = Engine(tiny_bundle, EngineOptions(budget_bytes=budget_bytes(tiny_bundle, budget), predictor="combined"))

    try:
        # Later passes find other experts resident (preloaded or kept), so they run in another order.
        passes = [engine.forward(prompt_ids, engine.new_cache(), all_logits=True) for _ in range(3)]
    finally:
        engine.close()

    for index, logits in enumerate(passes):
        assert np.array_equal(logits, expected), f"pass {index} differs"


# Budget accounting


class BudgetChecker:
    """Checks the store's accounting after every acquire, release and preload (both threads)."""

    def __init__(self, store: ExpertStore):
        self.store = store
        self.violations: list[str] = []
        self.checks = 0
        self.checks_with_inflight = 0
        self.inflight_bytes_seen = 0
        self._lock = threading.Lock()
        acquire, release, preload = store.acquire, store.release, store.preload

        def checked_acquire(layer: int, index: int):
            session = acquire(layer, index)
            self.check(f"acquire {(layer, index)}")
            return session

        def checked_release(layer: int, index: int) -> None:
            release(layer, index)
            self.check(f"release {(layer, index)}")

        def checked_preload(key) -> bool:
            self.check(f"before preload {key}")
            loaded = preload(key)
            self.check(f"after preload {key}")
            return loaded

        store.acquire, store.release, store.preload = checked_acquire, checked_release, checked_preload

    def check(self, event: str) -> None:
        used, resident, inflight = self.store.snapshot()
        manifest, budget = self.store.manifest, self.store.budget_bytes
        resident_sum = sum(manifest.expert(*key).resident_bytes for key in resident)
        inflight_sum = sum(manifest.expert(*key).resident_bytes for key in inflight)
        with self._lock:
            self.checks += 1
            if inflight:
                self.checks_with_inflight += 1
                self.inflight_bytes_seen = max(self.inflight_bytes_seen, inflight_sum)
            if used != resident_sum + inflight_sum:
                self.violations.append(f"{event}: accounted {used} != resident {resident_sum} + "
                                       f"in flight {inflight_sum}")
            if used > budget:
                self.violations.append(f"{event}: accounted {used} > budget {budget}")


@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_held_while_preloading(demo_bundle, reference, budget):
    limit = budget_bytes(demo_bundle, budget)
    generator = make_generator(demo_bundle, budget_bytes=limit, eviction="edgemoe", predictor="combined",
                               preload=True, preload_depth=2)
    store = generator.engine.store
    checker = BudgetChecker(store)

    try:
        tokens, _ = greedy_and_logits(generator, LONG_TOKENS)
    finally:
        generator.engine.close()

    assert checker.violations == []
    assert checker.checks > 4 * LONG_TOKENS
    # The checks count in-flight experts: without them the sums above could not be trusted.
    assert checker.checks_with_inflight > 0
    assert checker.inflight_bytes_seen > 0
    # At the minimum budget every preload may be dropped (no room without evicting experts the
    # last token used), so the I/O thread's attempts are counted, loaded or dropped.
    assert store.stats.preloads + store.stats.preloads_dropped > 0
    assert store.stats.peak_resident_bytes <= limit
    assert tokens[:GREEDY_TOKENS] == reference[0]


def test_budget_check_flags_skewed_counter(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    store = ExpertStore(tiny_bundle, manifest, manifest.expert_bytes)
    checker = BudgetChecker(store)
    store.acquire(0, 0)
    store.release(0, 0)
    assert checker.violations == []

    store._used_bytes -= 1  # what a lost in-flight reservation would look like
    checker.check("skewed")

    assert len(checker.violations) == 1
    assert checker.violations[0].startswith("skewed: accounted")


# In-flight loads


@pytest.fixture
def held_load(monkeypatch):
    """Hold the load of one expert file until a condition is true.

    Returns (set_target, calls, entered). `set_target(file, release_when, error=None)` picks the
    file and the condition (after WAIT_SECONDS the load goes on anyway), and `error` makes the
    held load fail. `calls` lists every session path created. `entered` is set when the held
    load starts.
    """
    real_session = expert_store_module.expert_session
    calls: list[str] = []
    entered = threading.Event()
    target: dict = {"file": None, "release_when": None, "error": None}

    def held_session(path: str, *args, **kwargs):
        calls.append(path)
        if target["file"] is not None and path.endswith(target["file"]):
            entered.set()
            deadline = time.monotonic() + WAIT_SECONDS
            while not target["release_when"]() and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
            if target["error"]:
                raise RuntimeError(target["error"])
        return real_session(path, *args, **kwargs)

    def set_target(file: str, release_when: Callable[[], bool], error: str | None = None) -> None:
        target.update(file=file, release_when=release_when, error=error)

    monkeypatch.setattr(expert_store_module, "expert_session", held_session)
    return set_target, calls, entered


def full_store(bundle) -> ExpertStore:
    manifest = load_manifest(bundle)
    return ExpertStore(bundle, manifest, manifest.expert_bytes)


def test_demand_waits_for_preload(tiny_bundle, held_load):
    set_target, calls, entered = held_load
    store = full_store(tiny_bundle)
    key = (1, 2)
    expert_file = store.manifest.expert(*key).file
    set_target(expert_file, release_when=lambda: store.stats.inflight_hits > 0)
    results: list[bool] = []
    preloading = threading.Thread(target=lambda: results.append(store.preload(key)))

    preloading.start()
    assert entered.wait(WAIT_SECONDS), "the preload never started loading"
    session = store.acquire(*key)
    preloading.join(WAIT_SECONDS)

    assert session is not None
    assert results == [True]
    assert len([path for path in calls if path.endswith(expert_file)]) == 1
    assert store.stats.loads == 1
    assert store.stats.inflight_hits == 1
    assert store.stats.misses == 0
    assert store.stats.preloads_used == 1
    store.release(*key)


def test_preload_skips_demand_in_flight(tiny_bundle, held_load):
    set_target, calls, entered = held_load
    store = full_store(tiny_bundle)
    key = (0, 4)
    expert_file = store.manifest.expert(*key).file
    preload_returned = threading.Event()
    set_target(expert_file, release_when=preload_returned.is_set)

    def acquire_and_release() -> None:
        store.acquire(*key)
        store.release(*key)

    demand = threading.Thread(target=acquire_and_release)

    demand.start()
    assert entered.wait(WAIT_SECONDS), "the demand never started loading"
    preloaded = store.preload(key)
    preload_returned.set()
    demand.join(WAIT_SECONDS)

    assert preloaded is False
    assert len([path for path in calls if path.endswith(expert_file)]) == 1
    assert store.stats.loads == 1
    assert store.stats.preloads == 0


def test_demand_on_failing_preload_raises(tiny_bundle, held_load):
    set_target, _, entered = held_load
    store = full_store(tiny_bundle)
    key = (1, 0)
    expert_file = store.manifest.expert(*key).file
    set_target(expert_file, release_when=lambda: store.stats.inflight_hits > 0, error="simulated read failure")
    preloading = threading.Thread(target=store.preload, args=(key,))

    preloading.start()
    assert entered.wait(WAIT_SECONDS), "the preload never started loading"
    with pytest.raises(BundleError) as error:
        store.acquire(*key)
    preloading.join(WAIT_SECONDS)

    assert expert_file in str(error.value)
    assert "simulated read failure" in str(error.value)
    assert store.inflight_keys() == []
    assert store.resident_bytes == 0


# I/O thread lifecycle


def test_close_stops_io_thread(tiny_bundle):
    generator = make_generator(tiny_bundle, predictor="auto", preload=True)
    generator.generate(generator.tokenizer.encode(PROMPT), 4, GREEDY)
    assert generator.engine.preloader.alive

    generator.engine.close()

    assert not generator.engine.preloader.alive


class PreloadWatcher:
    """Wraps store.preload to record each call's key and outcome; `wait` blocks until `count` calls ended."""

    def __init__(self, store: ExpertStore):
        self.outcomes: list[tuple[tuple[int, int], object]] = []
        self._cond = threading.Condition()
        preload = store.preload

        def watched_preload(key):
            try:
                loaded = preload(key)
            except Exception as exc:
                self._record(key, exc)
                raise
            self._record(key, loaded)
            return loaded

        store.preload = watched_preload

    def _record(self, key, outcome) -> None:
        with self._cond:
            self.outcomes.append((key, outcome))
            self._cond.notify_all()

    def wait(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.outcomes) >= count, WAIT_SECONDS), \
                f"only {len(self.outcomes)} of {count} preloads ended within {WAIT_SECONDS} s"


def test_raising_preload_keeps_io_thread(tiny_bundle):
    engine = Engine(tiny_bundle, EngineOptions(predictor="auto", preload=True))
    store = engine.store
    preload = store.preload
    raised = []

    def preload_failing_once(key):
        if not raised:
            raised.append(key)
            raise RuntimeError("simulated preload failure")
        return preload(key)

    store.preload = preload_failing_once
    watcher = PreloadWatcher(store)
    try:
        engine.preloader.request([(0, 1)])
        watcher.wait(1)
        engine.preloader.request([(0, 2)])
        watcher.wait(2)
        alive = engine.preloader.alive
    finally:
        engine.close()

    assert isinstance(watcher.outcomes[0][1], RuntimeError)
    assert alive
    assert watcher.outcomes[1] == ((0, 2), True)
    assert store.is_resident((0, 2))


def acquired_experts(generator: Generator, prompt: str) -> tuple[set[tuple[int, int]], list[int]]:
    """Experts a greedy generation of PROBE_TOKENS after `prompt` acquires, and its tokens."""
    store = generator.engine.store
    acquire = store.acquire
    seen: set[tuple[int, int]] = set()

    def recording_acquire(layer: int, index: int):
        seen.add((layer, index))
        return acquire(layer, index)

    store.acquire = recording_acquire
    try:
        result = generator.generate(generator.tokenizer.encode(prompt), PROBE_TOKENS, GREEDY)
    finally:
        store.acquire = acquire
    return seen, result.token_ids


@pytest.fixture(scope="module")
def corrupt_demo(demo_bundle, tmp_path_factory):
    """A demo bundle copy with one expert's weights altered: one PROMPT needs, OTHER_PROMPT does not.

    Returns (bundle, corrupt key, its weights file, OTHER_PROMPT's reference tokens).
    """
    probe = make_generator(demo_bundle, predictor=None, preload=False)
    needed, _ = acquired_experts(probe, PROMPT)
    other_needed, other_tokens = acquired_experts(probe, OTHER_PROMPT)
    candidates = sorted(needed - other_needed, key=lambda key: (key[0] == 0, key))
    assert candidates, "test setup: every expert PROMPT uses is also used by OTHER_PROMPT"
    key = candidates[0]  # prefer a layer after the first, so the failure comes mid-forward

    bundle = tmp_path_factory.mktemp("corrupt") / "demo"
    shutil.copytree(demo_bundle, bundle)
    weights_file = load_manifest(bundle).expert(*key).data_file
    flip_byte(bundle / weights_file, 100)
    return bundle, key, weights_file, other_tokens


def test_corrupt_preload_keeps_io_thread(corrupt_demo, caplog):
    bundle, key, weights_file, _ = corrupt_demo
    caplog.set_level(logging.INFO, logger="edgemoe.runtime.expert_store")
    engine = Engine(bundle, EngineOptions(predictor="auto", preload=True))
    store = engine.store
    watcher = PreloadWatcher(store)
    good_key = (key[0], (key[1] + 1) % engine.config.num_experts)

    try:
        engine.preloader.request([key])
        watcher.wait(1)
        alive_after_failure = engine.preloader.alive
        engine.preloader.request([good_key])
        watcher.wait(2)
    finally:
        engine.close()

    assert watcher.outcomes[0] == (key, False)
    assert alive_after_failure
    assert not store.is_available(key)
    assert watcher.outcomes[1] == (good_key, True)
    assert store.is_resident(good_key)
    assert store.stats.loads == 1
    assert any(weights_file in record.getMessage() for record in caplog.records), \
        "the failed preload was not logged with the file name"


def test_corrupt_expert_fails_only_its_generation(corrupt_demo):
    bundle, _, weights_file, other_tokens = corrupt_demo
    generator = make_generator(bundle, budget_bytes=budget_bytes(bundle, "25%"), predictor="auto", preload=True)

    try:
        with pytest.raises(BundleError) as error:
            generator.generate(generator.tokenizer.encode(PROMPT), PROBE_TOKENS, GREEDY)
        result = generator.generate(generator.tokenizer.encode(OTHER_PROMPT), PROBE_TOKENS, GREEDY)
        alive = generator.engine.preloader.alive
    finally:
        generator.engine.close()

    assert weights_file in str(error.value)
    assert "sha256" in str(error.value)
    assert result.token_ids == other_tokens
    assert alive


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_corrupt_expert_cli_exits_cleanly(corrupt_demo, run_cli, tmp_path, command):
    """The I/O thread may be inside onnxruntime when the error ends the process, which must not abort it."""
    bundle, _, weights_file, _ = corrupt_demo
    text = tmp_path / "prompt.txt"
    text.write_text(PROMPT, encoding="utf-8")
    arguments = {"generate": ["--prompt", PROMPT, "--max-tokens", "4", "--temperature", "0"],
                 "eval": ["--text", text]}[command]

    # Whether the I/O thread is inside onnxruntime when the process exits varies between runs.
    for run in range(CLI_RUNS):
        completed = run_cli([command, bundle, "--expert-budget", "25%", *arguments])

        assert completed.returncode == 1, f"run {run}: {completed.stderr}"
        assert "Traceback" not in completed.stderr
        # A failed preload is logged at INFO, below the default level: the error is the only line.
        lines = completed.stderr.splitlines()
        assert len(lines) == 1, f"run {run}: {completed.stderr}"
        assert lines[0].startswith("edgemoe: error: "), f"run {run}: {completed.stderr}"
        assert weights_file in lines[0]


def test_corrupt_expert_http_500_then_200(corrupt_demo):
    bundle, _, weights_file, other_tokens = corrupt_demo

    with run_server(ServerSettings(bundle=str(bundle))) as server, server.client() as client:
        failed = client.post("/generate", json={"prompt": PROMPT, "max_tokens": PROBE_TOKENS, "temperature": 0})
        served = client.post("/generate", json={"prompt": OTHER_PROMPT, "max_tokens": PROBE_TOKENS,
                                                "temperature": 0})
        health = client.get("/health")

    error = assert_error_shape(failed, 500)
    assert weights_file in error["message"]
    assert "sha256" in error["message"]
    assert served.status_code == 200, served.text
    assert served.json()["token_ids"] == other_tokens
    assert health.status_code == 200
