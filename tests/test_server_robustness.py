"""Server behaviour under load, disconnects, time limits, failures, limits, metrics and settings.

Invariants checked here:
- With the worker busy and `queue_size` requests waiting, further requests get 503 with
  Retry-After at once. Every admitted request gets its complete response, no request hangs,
  and the server keeps serving afterwards.
- Waiting requests are served in arrival order. A request cancelled while it waits is skipped.
- A client that disconnects (streamed or not) cancels its generation before the next token, so
  the next request starts at once. The cancellation is counted in
  `edgemoe_generations_total{finish_reason="cancelled"}`.
- `request_timeout` ends a generation with finish_reason "time_limit".
- A failure inside generation gives that request 500 in the error shape (in-band in a stream),
  and the next request succeeds.
- With `api_key`, every route but /health requires `Authorization: Bearer KEY` (else 401).
  Bodies above `max_body_bytes` get 413 and prompts above `max_prompt_tokens` get 400.
  CORS headers are sent only for `cors_origins`, also on 401 responses.
- /metrics is Prometheus text with the request, token, latency, queue and expert-store series,
  and they grow with requests.
- Every `edgemoe serve` flag has an EDGEMOE_* environment twin, and flags win over it.
- Random request bodies never produce a 500, and every non-200 response has the error shape.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemoe.runtime.demo import demo_bundle
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.sampling import SamplingParams
from edgemoe.server.settings import ServerSettings
from edgemoe.server.worker import END, Job, next_event

pytest.register_assert_rewrite("server_helpers")
from server_helpers import (  # noqa: E402
    CLIENT_TIMEOUT_SECONDS,
    STORY_PROMPT,
    assert_error_shape,
    metric_samples,
    metric_value,
    sse_events,
    sse_json,
)

pytest_plugins = ["server_helpers"]

QUEUE_SIZE = 8
CLIENTS = 20
CLIENT_TOKENS = 48
# A greedy generation from STORY_PROMPT runs about 300 tokens (about 1 s on 2 cores) before EOS,
# long enough to keep the worker busy while other requests arrive.
BLOCKER_BODY = {"prompt": STORY_PROMPT, "max_tokens": 400, "temperature": 0}


@pytest.fixture(scope="module")
def server(start_server):
    with start_server(queue_size=QUEUE_SIZE) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def _cancelled_count(client: httpx.Client) -> float:
    return metric_value(metric_samples(client), "edgemoe_generations_total", finish_reason="cancelled")


def _stream_in_background(server, body: dict, route: str = "/v1/completions"):
    """Start a streamed request in a thread; return (thread, event set once the first data arrived)."""
    first_data = threading.Event()

    def run():
        with server.client() as client, client.stream("POST", route, json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    first_data.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, first_data


# ---------------------------------------------------------------- queue


def test_queue_overflow_gets_503(server, http):
    blocker, blocker_started = _stream_in_background(server, BLOCKER_BODY)
    assert blocker_started.wait(CLIENT_TIMEOUT_SECONDS)

    barrier = threading.Barrier(CLIENTS, timeout=CLIENT_TIMEOUT_SECONDS)
    responses: list[httpx.Response | BaseException] = []
    lock = threading.Lock()

    def client_thread(client: httpx.Client):
        barrier.wait()
        try:
            result = client.post("/v1/completions", json={"prompt": STORY_PROMPT, "max_tokens": CLIENT_TOKENS,
                                                          "temperature": 0})
        except BaseException as exc:  # reported by the asserts below
            result = exc
        with lock:
            responses.append(result)

    with server.client(limits=httpx.Limits(max_connections=CLIENTS)) as client:
        threads = [threading.Thread(target=client_thread, args=(client,), daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT_SECONDS)
    blocker.join(CLIENT_TIMEOUT_SECONDS)

    assert not any(t.is_alive() for t in threads), "a client request hung"
    assert [r for r in responses if isinstance(r, BaseException)] == []
    accepted = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 503]
    assert len(accepted) + len(rejected) == CLIENTS, [r.status_code for r in responses]
    assert accepted, "no request was admitted"
    assert rejected, "the queue limit never rejected a request"
    for response in accepted:
        body = response.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == CLIENT_TOKENS
    for response in rejected:
        error = assert_error_shape(response, 503)
        assert error["code"] == "queue_full"
        assert int(response.headers["retry-after"]) > 0


def test_server_serves_after_overflow(http):
    assert http.get("/health").status_code == 200
    response = http.post("/v1/completions", json={"prompt": STORY_PROMPT, "max_tokens": 4})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4
    assert metric_value(metric_samples(http), "edgemoe_queue_length") == 0


def test_queue_serves_in_arrival_order(server):
    blocker, blocker_started = _stream_in_background(server, BLOCKER_BODY)
    assert blocker_started.wait(CLIENT_TIMEOUT_SECONDS)

    count = 4
    first_token_at = [0.0] * count
    opened = [threading.Event() for _ in range(count)]

    def run(index: int):
        body = {"prompt": STORY_PROMPT, "max_tokens": 24, "temperature": 0, "stream": True}
        with server.client() as client, client.stream("POST", "/v1/completions", json=body) as response:
            opened[index].set()  # the response headers come after the job was queued
            for line in response.iter_lines():
                if line.startswith("data: ") and not first_token_at[index]:
                    first_token_at[index] = time.monotonic()

    threads = []
    for index in range(count):
        threads.append(threading.Thread(target=run, args=(index,), daemon=True))
        threads[-1].start()
        assert opened[index].wait(CLIENT_TIMEOUT_SECONDS)
    for thread in threads + [blocker]:
        thread.join(CLIENT_TIMEOUT_SECONDS)

    assert all(first_token_at)
    assert first_token_at == sorted(first_token_at)


def test_worker_runs_jobs_fifo(server):
    worker = server.worker
    prompt_ids = worker.model.tokenizer.encode(STORY_PROMPT)
    finished: list[tuple[str, str]] = []

    async def run_jobs():
        loop = asyncio.get_running_loop()
        jobs = [Job(request_id=f"job{i}", prompt_ids=prompt_ids, max_tokens=8,
                    params=SamplingParams(temperature=0), stop=[], timeout=60, loop=loop,
                    on_done=lambda job, reason: finished.append((job.request_id, reason)))
                for i in range(6)]
        for job in jobs:
            worker.submit(job)
        jobs[3].cancel.set()  # still waiting behind jobs 0-2
        for job in jobs:
            while await asyncio.wait_for(next_event(job), CLIENT_TIMEOUT_SECONDS) is not END:
                pass

    asyncio.run(run_jobs())

    assert finished == [("job0", "length"), ("job1", "length"), ("job2", "length"), ("job3", "cancelled"),
                        ("job4", "length"), ("job5", "length")]


# ---------------------------------------------------------------- disconnect


@pytest.fixture(scope="module")
def reference_seconds(http) -> float:
    """Wall time of the whole BLOCKER_BODY generation, the work a disconnect should save."""
    started = time.monotonic()
    response = http.post("/v1/completions", json=BLOCKER_BODY)
    elapsed = time.monotonic() - started
    assert response.json()["usage"]["completion_tokens"] >= 200  # precondition: a long generation
    return elapsed


def _one_token_seconds(client: httpx.Client) -> float:
    started = time.monotonic()
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert response.status_code == 200
    return time.monotonic() - started


def test_stream_disconnect_frees_worker(server, http, reference_seconds):
    cancelled_before = _cancelled_count(http)

    with server.client() as client:
        with client.stream("POST", "/v1/completions", json={**BLOCKER_BODY, "stream": True}) as response:
            lines = response.iter_lines()
            data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        # leaving the block closed the connection in the middle of the stream
    next_request_seconds = _one_token_seconds(http)

    assert len(data) >= 3
    assert next_request_seconds < reference_seconds / 2
    assert _cancelled_count(http) == cancelled_before + 1


def test_whole_response_disconnect_frees_worker(server, http, reference_seconds):
    cancelled_before = _cancelled_count(http)

    with server.client(timeout=reference_seconds / 4) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=BLOCKER_BODY)
    next_request_seconds = _one_token_seconds(http)

    assert next_request_seconds < reference_seconds / 2
    assert _cancelled_count(http) == cancelled_before + 1


# ---------------------------------------------------------------- time limit


def test_request_timeout_ends_generation(start_server):
    with start_server(request_timeout=0.2) as limited, limited.client() as client:
        whole = client.post("/v1/completions", json=BLOCKER_BODY).json()
        with client.stream("POST", "/v1/completions", json={**BLOCKER_BODY, "stream": True}) as response:
            events = sse_json(sse_events(response))
        time_limits = metric_value(metric_samples(client), "edgemoe_generations_total", finish_reason="time_limit")

    assert whole["choices"][0]["finish_reason"] == "time_limit"
    assert whole["usage"]["completion_tokens"] < BLOCKER_BODY["max_tokens"]
    assert events[-1]["choices"][0]["finish_reason"] == "time_limit"
    assert time_limits == 2


# ---------------------------------------------------------------- failures inside generation


@pytest.fixture
def fail_next_generation(server, monkeypatch):
    """Make the next generation raise RuntimeError("injected failure") in the worker thread."""
    generator = server.worker.model.generator
    original = generator.stream
    calls = []

    def stream(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(generator, "stream", stream)
    return calls


def test_generation_failure_gives_500(http, fail_next_generation):
    failed = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 4})
    recovered = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 4})

    error = assert_error_shape(failed, 500)
    assert error["code"] == "internal_error"
    assert "injected failure" in error["message"]
    assert recovered.status_code == 200
    assert recovered.json()["usage"]["completion_tokens"] == 4


def test_stream_failure_reported_in_band(http, fail_next_generation):
    body = {"prompt": STORY_PROMPT, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        payloads = sse_events(response)
    recovered = http.post("/v1/completions", json={**body, "stream": False})

    errors = [event for event in sse_json(payloads) if "error" in event]
    assert len(errors) == 1
    assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    assert "injected failure" in errors[0]["error"]["message"]
    assert payloads[-1] == "[DONE]"
    assert recovered.status_code == 200


def test_missing_expert_file_fails_one_request(start_server, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle, copy_function=os.link)  # hard links: no 50 MB copy
    manifest = load_manifest(bundle)
    layer0 = [name for e in manifest.experts if e.layer == 0 for name in (e.file, e.data_file)]
    hidden = tmp_path / "hidden"
    hidden.mkdir()

    with start_server(bundle=str(bundle)) as broken, broken.client() as client:
        for name in layer0:  # as if the storage lost the files after start-up
            (bundle / name).rename(hidden / Path(name).name)
        failed = client.post("/v1/completions", json={"prompt": STORY_PROMPT, "max_tokens": 4})
        for name in layer0:
            (hidden / Path(name).name).rename(bundle / name)
        recovered = client.post("/v1/completions", json={"prompt": STORY_PROMPT, "max_tokens": 4})

    error = assert_error_shape(failed, 500)
    assert "l00_e" in error["message"]
    assert recovered.status_code == 200
    assert recovered.json()["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------- security and limits

API_KEY = "secret"
ORIGIN = "http://example.test"


@pytest.fixture(scope="module")
def guarded(start_server):
    with start_server(api_key=API_KEY, cors_origins=[ORIGIN], max_body_bytes=2048, max_prompt_tokens=64) as running:
        yield running


@pytest.fixture(scope="module")
def guarded_http(guarded):
    with guarded.client() as client:
        yield client


AUTH = {"authorization": f"Bearer {API_KEY}"}
SMALL_COMPLETION = {"prompt": STORY_PROMPT, "max_tokens": 2}


def test_missing_key_rejected(guarded_http):
    response = guarded_http.post("/v1/completions", json=SMALL_COMPLETION)

    error = assert_error_shape(response, 401)
    assert error["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer secre", "Bearer secret2", "Bearer", "secret",
                                    "Basic c2VjcmV0"])
def test_wrong_key_rejected(guarded_http, header):
    response = guarded_http.post("/v1/completions", json=SMALL_COMPLETION, headers={"authorization": header})

    assert_error_shape(response, 401)


@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
def test_key_required_on_reads(guarded_http, path):
    assert_error_shape(guarded_http.get(path), 401)


def test_right_key_accepted(guarded_http):
    response = guarded_http.post("/v1/completions", json=SMALL_COMPLETION, headers=AUTH)

    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2


def test_key_scheme_case_insensitive(guarded_http):
    response = guarded_http.post("/v1/completions", json=SMALL_COMPLETION,
                                 headers={"authorization": f"bearer {API_KEY}"})

    assert response.status_code == 200


def test_openai_client_sends_key(guarded):
    import openai

    with guarded.openai(api_key=API_KEY) as client:
        listed = [m.id for m in client.models.list().data]
    with guarded.openai(api_key="wrong") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()

    assert listed == [demo_bundle().name]


def test_health_open_without_key(guarded_http):
    assert guarded_http.get("/health").status_code == 200


def test_large_body_rejected(guarded_http):
    body = {"prompt": "x" * 4096, "max_tokens": 1}
    response = guarded_http.post("/v1/completions", json=body, headers=AUTH)

    error = assert_error_shape(response, 413)
    assert "2048" in error["message"]


def test_large_chunked_body_rejected(guarded_http):
    payload = json.dumps({"prompt": "x" * 4096, "max_tokens": 1}).encode()

    def chunks():  # no content-length: the server must count the bytes itself
        for start in range(0, len(payload), 1000):
            yield payload[start:start + 1000]

    response = guarded_http.post("/v1/completions", content=chunks(),
                                 headers={**AUTH, "content-type": "application/json"})

    assert_error_shape(response, 413)


def test_long_prompt_rejected(guarded_http):
    response = guarded_http.post("/v1/completions", json={"prompt": "dog " * 100, "max_tokens": 1}, headers=AUTH)

    error = assert_error_shape(response, 400)
    assert error["param"] == "prompt"
    assert "64" in error["message"]


def test_cors_preflight_allowed_origin(guarded_http):
    response = guarded_http.options("/v1/chat/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_cors_other_origin_refused(guarded_http):
    response = guarded_http.options("/v1/chat/completions", headers={
        "origin": "http://other.test", "access-control-request-method": "POST"})

    assert "access-control-allow-origin" not in response.headers


def test_cors_headers_on_401(guarded_http):
    response = guarded_http.post("/v1/completions", json=SMALL_COMPLETION, headers={"origin": ORIGIN})

    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_cors_off_by_default(http):
    preflight = http.options("/v1/chat/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST"})
    simple = http.get("/health", headers={"origin": ORIGIN})

    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers


# ---------------------------------------------------------------- metrics

COUNTERS_PER_REQUEST = ["edgemoe_expert_loads_total", "edgemoe_expert_misses_total",
                        "edgemoe_expert_evictions_total", "edgemoe_expert_bytes_read_total",
                        "edgemoe_expert_stall_seconds_total", "edgemoe_expert_hits_total"]
EXPECTED_SERIES = ["edgemoe_requests_total", "edgemoe_prompt_tokens_total", "edgemoe_generated_tokens_total",
                   "edgemoe_time_to_first_token_seconds_count", "edgemoe_time_per_output_token_seconds_count",
                   "edgemoe_queue_length", "edgemoe_expert_resident_bytes", "edgemoe_expert_budget_bytes",
                   *COUNTERS_PER_REQUEST]


@pytest.fixture(scope="module")
def metered(start_server):
    """A server whose expert budget fits a quarter of the experts, so every request loads some."""
    with start_server(expert_budget="25%") as running, running.client() as client:
        yield running, client


def test_metrics_prometheus_text(metered):
    _, client = metered
    response = client.get("/metrics")

    assert response.headers["content-type"].startswith("text/plain")
    names = {name for name, _ in metric_samples(client)}
    for series in EXPECTED_SERIES:
        assert series in names, series


def test_metrics_grow_with_requests(metered):
    _, client = metered
    before = metric_samples(client)
    response = client.post("/v1/completions", json={"prompt": STORY_PROMPT, "max_tokens": 16, "temperature": 0})
    after = metric_samples(client)

    assert response.status_code == 200

    def grew(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("edgemoe_requests_total", route="/v1/completions", status="200") == 1
    assert grew("edgemoe_prompt_tokens_total") == 5
    assert grew("edgemoe_generated_tokens_total") == 16
    assert grew("edgemoe_generations_total", finish_reason="length") == 1
    assert grew("edgemoe_time_to_first_token_seconds_count") == 1
    assert grew("edgemoe_time_per_output_token_seconds_count") == 15
    for name in COUNTERS_PER_REQUEST:
        assert grew(name) > 0, name


def test_metrics_expert_gauges(metered):
    running, client = metered
    samples = metric_samples(client)
    expected_budget = load_manifest(demo_bundle()).expert_bytes // 4

    assert metric_value(samples, "edgemoe_expert_budget_bytes") == pytest.approx(expected_budget, rel=0.01)
    assert 0 < metric_value(samples, "edgemoe_expert_resident_bytes") <= metric_value(
        samples, "edgemoe_expert_budget_bytes")
    assert metric_value(samples, "edgemoe_queue_length") == 0


def test_metrics_unknown_paths_grouped(metered):
    _, client = metered
    client.get("/no-such-path-123")
    samples = metric_samples(client)

    assert metric_value(samples, "edgemoe_requests_total", route="other", status="404") >= 1
    assert not [key for key in samples if ("route", "/no-such-path-123") in key[1]]


# ---------------------------------------------------------------- settings

# settings field -> (environment value, parsed value); one row per `edgemoe serve` option
ENV_CASES = {
    "bundle": ("/data/bundle", "/data/bundle"),
    "expert_budget": ("25%", "25%"),
    "threads": ("3", 3),
    "verify": ("false", False),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("8123", 8123),
    "model_id": ("my-model", "my-model"),
    "api_key": ("k3y", "k3y"),
    "queue_size": ("5", 5),
    "request_timeout": ("2.5", 2.5),
    "max_body_bytes": ("4096", 4096),
    "max_prompt_tokens": ("100", 100),
    "cors_origins": ("http://a.test, http://b.test", ["http://a.test", "http://b.test"]),
    "eviction": ("edgemoe", "edgemoe"),
    "predictor": ("table", "table"),
    "preload": ("false", False),
    "preload_depth": ("2", 2),
}


def _serve_option_fields() -> set[str]:
    """Settings fields of every `edgemoe serve` argument (--no-verify sets `verify`, --no-preload
    sets `preload`)."""
    import argparse

    from edgemoe.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = subparsers.choices["serve"]
    fields = {a.dest for a in serve._actions if not isinstance(a, argparse._HelpAction)}
    renamed = {"no_verify": "verify", "no_preload": "preload"}
    return {renamed.get(f, f) for f in fields}


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("EDGEMOE_") and name != "EDGEMOE_CACHE_DIR":
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_flag_is_a_setting():
    assert _serve_option_fields() == set(ServerSettings.model_fields)


def test_every_setting_has_env_case():
    assert set(ENV_CASES) == set(ServerSettings.model_fields)


@pytest.mark.parametrize("field", sorted(ENV_CASES))
def test_env_twin_sets_field(clean_env, field):
    text, expected = ENV_CASES[field]
    clean_env.setenv(f"EDGEMOE_{field.upper()}", text)

    assert getattr(ServerSettings(), field) == expected


def test_flags_override_env(clean_env):
    import uvicorn

    from edgemoe.cli import main

    captured = {}
    clean_env.setattr(uvicorn, "run", lambda app, **options: captured.update(app=app, options=options))
    clean_env.setenv("EDGEMOE_PORT", "9999")
    clean_env.setenv("EDGEMOE_API_KEY", "from-env")
    clean_env.setenv("EDGEMOE_QUEUE_SIZE", "2")

    exit_code = main(["serve", "--port", "1234", "--queue-size", "3", "--cors-origin", "http://a.test",
                      "--cors-origin", "http://b.test", "--no-verify"])

    settings_used = captured["app"].state.settings
    assert exit_code == 0
    assert captured["options"]["port"] == 1234
    assert settings_used.port == 1234
    assert settings_used.queue_size == 3
    assert settings_used.api_key == "from-env"
    assert settings_used.cors_origins == ["http://a.test", "http://b.test"]
    assert settings_used.verify is False


# ---------------------------------------------------------------- fuzzing

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# Valid token counts stay at 4 or below so every example is fast; larger integers exceed the
# 512-token context window and are rejected before generation. null is left out because it
# means "fill the context window".
TOKEN_COUNTS = (st.integers(-3, 4) | st.integers(520, 2**70) | st.floats(-3, 4.5)
                | st.sampled_from(["ten", "", "1e9", [], {}, True]))
NUMBERS = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10, 10**9) | JSON_SCALARS
SAMPLING_FIELDS = {name: NUMBERS for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                              "frequency_penalty", "repetition_penalty", "seed")}
COMMON_FIELDS = {
    **SAMPLING_FIELDS,
    "stop": st.lists(st.text(max_size=6), max_size=6) | JSON_VALUES,
    "stream": st.booleans() | JSON_SCALARS,
    "unknown_field": JSON_VALUES,
}
OPENAI_FIELDS = {
    **COMMON_FIELDS,
    "n": st.integers(-1, 3) | JSON_SCALARS,
    "model": JSON_SCALARS,
    "user": JSON_SCALARS,
    "max_completion_tokens": TOKEN_COUNTS,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": JSON_SCALARS}) | JSON_VALUES,
}
PROMPTS = st.text(max_size=120) | JSON_VALUES
CONTENT_PARTS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                "text": st.text(max_size=20)}), max_size=2)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot"]) | JSON_SCALARS,
    "content": st.text(max_size=80) | st.none() | CONTENT_PARTS | JSON_VALUES,
}), max_size=4) | JSON_VALUES

BODIES = {
    "/v1/chat/completions": st.fixed_dictionaries({"messages": MESSAGES, "max_tokens": TOKEN_COUNTS},
                                                  optional=OPENAI_FIELDS),
    "/v1/completions": st.fixed_dictionaries({"prompt": PROMPTS, "max_tokens": TOKEN_COUNTS},
                                             optional={**OPENAI_FIELDS, "echo": JSON_SCALARS}),
    "/generate": st.fixed_dictionaries({"prompt": PROMPTS, "max_tokens": TOKEN_COUNTS}, optional=COMMON_FIELDS),
}


@pytest.mark.parametrize("route", sorted(BODIES))
def test_random_bodies_never_fail(http, route):
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=BODIES[route])
    def check(body):
        with http.stream("POST", route, json=body) as response:
            status = response.status_code
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                payloads = sse_events(response)
            else:
                payloads = None
                response.read()

        assert status != 500, response.text
        if payloads is not None:
            assert status == 200
            assert payloads[-1] == "[DONE]"
            assert [e for e in sse_json(payloads) if "error" in e] == []
        elif status != 200:
            assert_error_shape(response, status)

    check()
