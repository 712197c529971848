"""Helpers and fixtures for the HTTP server tests: a real uvicorn server on 127.0.0.1 in a thread.

Test modules load this file with `pytest_plugins = ["server_helpers"]`. The demo model is
exported once per session into EDGEMOE_CACHE_DIR, which points at a temporary directory unless
it is already set. `served_demo` is one server with default settings shared by all modules.
Tests that need other settings start their own server with `start_server`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from edgemoe.server.app import create_app
from edgemoe.server.settings import ServerSettings

SERVER_START_TIMEOUT_SECONDS = 30
MODEL_LOAD_TIMEOUT_SECONDS = 60
CLIENT_TIMEOUT_SECONDS = 120
ERROR_FIELDS = {"message", "type", "param", "code"}

# A prompt whose greedy continuation with the demo model runs for about 300 tokens before EOS.
STORY_PROMPT = "Once upon a time"


@dataclass
class RunningServer:
    app: object  # the FastAPI app, for tests that reach into app.state
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker(self):
        return self.app.state.worker

    def client(self, **options) -> httpx.Client:
        options.setdefault("timeout", CLIENT_TIMEOUT_SECONDS)
        return httpx.Client(base_url=self.base_url, **options)

    def openai(self, api_key: str = "x", **options):
        from openai import OpenAI

        options.setdefault("timeout", CLIENT_TIMEOUT_SECONDS)
        options.setdefault("max_retries", 0)
        return OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, **options)


@contextlib.contextmanager
def run_server(settings: ServerSettings) -> Iterator[RunningServer]:
    """Start the app for `settings` on 127.0.0.1 (free port) and wait until /health returns 200."""
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {SERVER_START_TIMEOUT_SECONDS} s")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        running = RunningServer(app=app, port=port)
        _wait_until_healthy(running)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait_until_healthy(running: RunningServer) -> None:
    deadline = time.monotonic() + MODEL_LOAD_TIMEOUT_SECONDS
    with running.client(timeout=10) as client:
        while True:
            response = client.get("/health")
            if response.status_code == 200:
                return
            if running.app.state.load_error:
                raise RuntimeError(f"the model failed to load: {running.app.state.load_error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"/health did not return 200 within {MODEL_LOAD_TIMEOUT_SECONDS} s")
            time.sleep(0.05)


def assert_error_shape(response: httpx.Response, status: int) -> dict:
    """Assert `response` has `status` and the OpenAI error shape; return the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["type"], str) and body["error"]["type"], body
    return body["error"]


def sse_events(response: httpx.Response) -> list[str]:
    """Payloads of the `data:` lines of a server-sent-events response, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def sse_json(payloads: list[str]) -> list[dict]:
    """The JSON payloads, without the final `[DONE]`."""
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Scrape /metrics: {(sample name, sorted label items): value}."""
    response = client.get("/metrics")
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_value(samples: dict, name: str, **labels) -> float:
    """Value of one sample, 0.0 when the labelled series does not exist yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """EDGEMOE_CACHE_DIR for the session, with the demo model already exported into it."""
    previous = os.environ.get("EDGEMOE_CACHE_DIR")
    if previous is None:
        os.environ["EDGEMOE_CACHE_DIR"] = str(tmp_path_factory.mktemp("edgemoe-cache"))
    from edgemoe.runtime.demo import demo_bundle

    demo_bundle()
    try:
        yield Path(os.environ["EDGEMOE_CACHE_DIR"])
    finally:
        if previous is None:
            os.environ.pop("EDGEMOE_CACHE_DIR", None)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_cache_dir):
    """The demo model's BundleTokenizer, for computing expected token counts."""
    from edgemoe.runtime.demo import demo_bundle
    from edgemoe.runtime.manifest import load_manifest
    from edgemoe.runtime.tokenizer import BundleTokenizer

    bundle = demo_bundle()
    return BundleTokenizer(bundle, load_manifest(bundle))


@pytest.fixture(scope="session")
def served_demo(demo_cache_dir) -> Iterator[RunningServer]:
    """The demo model behind a server with default settings."""
    with run_server(ServerSettings()) as running:
        yield running


@pytest.fixture(scope="session")
def start_server(demo_cache_dir):
    """Context manager factory: `with start_server(queue_size=2) as server: ...`."""

    def start(**settings) -> contextlib.AbstractContextManager[RunningServer]:
        return run_server(ServerSettings(**settings))

    return start
