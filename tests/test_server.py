"""The HTTP server, run by uvicorn on 127.0.0.1 with a port chosen by the OS.

Invariants checked:
- GET /health returns 503 with an error body while the model loads, and POST /generate
  returns 503 with Retry-After. /health returns 200 once the model is ready, and 503 naming
  the cause when loading failed.
- POST /generate returns text, token_ids, finish_reason, usage, timings and experts. Its
  greedy output equals the CLI's for the same prompt.
- Every error has the body {"error": {"message", "type", "param", "code"}}.
- Validation errors are 400 and name the field, and invalid JSON is 400.
- An unknown route is 404 and GET /generate is 405.
- A prompt longer than the context window is 400 naming both token counts.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

import edgemoe.server.app as app_module
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.tokenizer import BundleTokenizer
from edgemoe.server.app import create_app
from edgemoe.server.settings import ServerSettings

START_TIMEOUT_SECONDS = 30
READY_TIMEOUT_SECONDS = 60
ERROR_FIELDS = {"message", "type", "param", "code"}
PROMPT = "Once upon a time there was a boy who"


@contextmanager
def running_server(app):
    """Run `app` with uvicorn in a background thread, yield its base URL, then stop it."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the uvicorn thread exited before the server started")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {START_TIMEOUT_SECONDS} s")
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_SECONDS)
        assert not thread.is_alive(), "the server thread did not stop"


def wait_for_health(client: httpx.Client, status: int, timeout: float = READY_TIMEOUT_SECONDS,
                    changed_from: str | None = None) -> httpx.Response:
    """Poll GET /health until it returns `status` (and a message other than `changed_from`)."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/health")
        message = response.json().get("error", {}).get("message")
        if response.status_code == status and (changed_from is None or message != changed_from):
            return response
        if time.monotonic() > deadline:
            raise TimeoutError(f"/health returned {response.status_code} {response.text} after {timeout} s")
        time.sleep(0.05)


def assert_error_shape(response: httpx.Response, status: int) -> dict:
    """Check the status and the error body shape, and return the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_FIELDS
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def demo_client(demo_bundle):
    with running_server(create_app(ServerSettings(bundle=str(demo_bundle)))) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_for_health(client, 200)
            yield client


def test_health_ready(demo_client, demo_bundle):
    response = demo_client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": demo_bundle.name}


def test_generate_matches_cli(demo_client, demo_bundle, run_cli):
    response = demo_client.post("/generate", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    completed = run_cli(["generate", demo_bundle, "--prompt", PROMPT, "--max-tokens", "24", "--temperature", "0",
                         "--json"])

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"text", "token_ids", "finish_reason", "usage", "timings", "experts"}
    assert completed.returncode == 0, completed.stderr
    cli_output = json.loads(completed.stdout)
    assert body["token_ids"] == cli_output["token_ids"]
    assert body["text"] == cli_output["text"]
    assert body["finish_reason"] == cli_output["finish_reason"]


def test_generate_usage_and_experts(demo_client, demo_bundle):
    response = demo_client.post("/generate", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})

    assert response.status_code == 200, response.text
    body = response.json()
    prompt_tokens = len(BundleTokenizer(demo_bundle, load_manifest(demo_bundle)).encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                             "total_tokens": prompt_tokens + 5}
    assert body["finish_reason"] == "length"
    assert set(body["timings"]) == {"prefill_seconds", "decode_seconds", "prefill_tokens_per_second",
                                    "decode_tokens_per_second"}
    assert set(body["experts"]) == {"loads", "hits", "misses", "bytes_read", "load_seconds",
                                    "peak_resident_bytes", "budget_bytes"}
    assert body["experts"]["peak_resident_bytes"] <= body["experts"]["budget_bytes"]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", "hot"), ("temperature", -1),
    ("top_k", -3), ("top_p", 0), ("seed", -1), ("prompt", 5),
])
def test_invalid_field_400(demo_client, field, value):
    body = {"prompt": PROMPT, field: value}

    error = assert_error_shape(demo_client.post("/generate", json=body), 400)

    assert error["param"] == field
    assert field in error["message"]
    assert error["type"] == "invalid_request_error"


def test_missing_prompt_400(demo_client):
    error = assert_error_shape(demo_client.post("/generate", json={"max_tokens": 4}), 400)

    assert error["param"] == "prompt"


def test_invalid_json_400(demo_client):
    response = demo_client.post("/generate", content=b'{"prompt": "x",}',
                                headers={"content-type": "application/json"})

    error = assert_error_shape(response, 400)
    assert error["param"] is None
    assert "JSON" in error["message"]


def test_unknown_route_404(demo_client):
    error = assert_error_shape(demo_client.get("/no-such-route"), 404)

    assert error["type"] == "not_found_error"


def test_get_generate_405(demo_client):
    response = demo_client.get("/generate")

    assert_error_shape(response, 405)
    assert response.headers["allow"] == "POST"


def test_prompt_too_long_400(demo_client, demo_bundle):
    prompt = "dog " * 600
    prompt_tokens = len(BundleTokenizer(demo_bundle, load_manifest(demo_bundle)).encode(prompt))

    error = assert_error_shape(demo_client.post("/generate", json={"prompt": prompt}), 400)

    assert str(prompt_tokens) in error["message"]
    assert "512" in error["message"]
    assert error["param"] == "prompt"
    assert error["code"] == "context_length_exceeded"


def test_health_503_while_loading(tiny_bundle, monkeypatch):
    gate = threading.Event()
    load_model = app_module.load_model

    def gated_load_model(*args, **kwargs):
        gate.wait(READY_TIMEOUT_SECONDS)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_model", gated_load_model)
    with running_server(create_app(ServerSettings(bundle=str(tiny_bundle)))) as url, httpx.Client(base_url=url, timeout=60) as client:
        try:
            health = assert_error_shape(client.get("/health"), 503)
            generate = client.post("/generate", json={"prompt": PROMPT})
            generate_error = assert_error_shape(generate, 503)
        finally:
            gate.set()
        ready = wait_for_health(client, 200)

    assert health["code"] == "model_not_ready"
    assert "loading" in health["message"]
    assert generate_error["code"] == "model_not_ready"
    assert generate.headers["retry-after"] == "1"
    assert ready.json()["status"] == "ok"


def test_health_503_after_failed_load(tmp_path):
    missing = tmp_path / "no-such-bundle"

    app = create_app(ServerSettings(bundle=str(missing)))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = wait_for_health(client, 503, changed_from="model is loading")
        generate = client.post("/generate", json={"prompt": "Once"})

    error = assert_error_shape(response, 503)
    assert "failed to load" in error["message"]
    assert str(missing) in error["message"]
    generate_error = assert_error_shape(generate, 503)
    assert "failed to load" in generate_error["message"]
    assert generate_error["code"] == "model_load_failed"
