"""OpenAI-compatible routes, driven by the official `openai` client and by raw httpx requests.

Invariants checked here:
- Chat and text completions work whole and streamed. A stream carries the same text as the
  whole response to the same request (greedy, or sampled with a seed).
- Reaching `max_tokens` gives finish_reason "length" and completion_tokens == max_tokens.
- Usage is in every whole response. A stream has it in its last chunk, and only with
  `stream_options.include_usage`.
- `n` other than 1 is rejected with 400. `/v1/models` reports the bundle name or `model_id`.
- Unknown request fields are ignored. An invalid field gives 400 in the error shape, with
  `param` naming the field and the message quoting the value received.
- Prompt tokens + max_tokens beyond the 512-token context window give 400 naming both numbers.
  Without max_tokens the generation is clamped to the rest of the window.
- Unknown routes (404) and wrong methods (405) use the error shape. SSE ends with `[DONE]`.
"""

from __future__ import annotations

import json

import openai
import pytest

from edgemoe.runtime.demo import demo_bundle

pytest.register_assert_rewrite("server_helpers")
from server_helpers import STORY_PROMPT, assert_error_shape, sse_events, sse_json  # noqa: E402

pytest_plugins = ["server_helpers"]

CONTEXT_TOKENS = 512  # the demo model's context window
CHAT_MESSAGES = [{"role": "system", "content": "You tell short stories."},
                 {"role": "user", "content": "Tell me a story about a dog."}]
# 33 repetitions give a prompt of 502 demo tokens whose greedy continuation has no EOS in the
# remaining 10 tokens (checked with the demo model).
LONG_PROMPT = "Once upon a time, " + "Tom and Sue went to the big park. They played with a ball. " * 33


@pytest.fixture(scope="module")
def client(served_demo):
    with served_demo.openai() as openai_client:
        yield openai_client


@pytest.fixture(scope="module")
def http(served_demo):
    with served_demo.client() as http_client:
        yield http_client


def _chat_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _completion_text(chunks) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


# ---------------------------------------------------------------- official client


def test_chat_completion_whole(client, demo_tokenizer):
    from edgemoe.runtime.chat_template import ChatTemplate

    response = client.chat.completions.create(model="any", messages=CHAT_MESSAGES, max_tokens=24,
                                              temperature=0)
    expected_prompt_tokens = len(ChatTemplate(demo_tokenizer).render(CHAT_MESSAGES).token_ids)

    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens == expected_prompt_tokens
    assert response.usage.total_tokens == expected_prompt_tokens + 24


def test_chat_completion_stream(client):
    chunks = list(client.chat.completions.create(model="any", messages=CHAT_MESSAGES, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    assert _chat_text(chunks)


def test_completion_whole(client):
    response = client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=24, temperature=0)

    assert response.object == "text_completion"
    assert response.choices[0].text
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens == 5  # BOS + 4 tokens of "Once upon a time"
    assert response.usage.total_tokens == 29


def test_completion_stream(client):
    chunks = list(client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))

    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == 5
    assert _completion_text(chunks)


def test_stream_without_include_usage(client):
    chunks = list(client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=8, temperature=0,
                                            stream=True))

    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_chat_stream_equals_whole(client, sampling):
    whole = client.chat.completions.create(model="any", messages=CHAT_MESSAGES, max_tokens=64, **sampling)
    chunks = list(client.chat.completions.create(model="any", messages=CHAT_MESSAGES, max_tokens=64,
                                                 stream=True, stream_options={"include_usage": True},
                                                 **sampling))

    assert _chat_text(chunks) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_completion_stream_equals_whole(client, sampling):
    whole = client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=64, **sampling)
    chunks = list(client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=64, stream=True,
                                            stream_options={"include_usage": True}, **sampling))

    assert _completion_text(chunks) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seed_repeats_sampled_text(client):
    first = client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=32, temperature=0.8, seed=99)
    second = client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=32, temperature=0.8, seed=99)

    assert first.choices[0].text == second.choices[0].text


@pytest.mark.parametrize("max_tokens", [1, 7, 50])
def test_max_tokens_finishes_with_length(client, max_tokens):
    response = client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=max_tokens, temperature=0)

    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == max_tokens


def test_max_completion_tokens_wins(client):
    response = client.chat.completions.create(model="any", messages=CHAT_MESSAGES, max_tokens=40,
                                              max_completion_tokens=6, temperature=0)

    assert response.usage.completion_tokens == 6


def test_n_above_one_rejected(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="any", messages=CHAT_MESSAGES, max_tokens=4, n=2)

    assert raised.value.status_code == 400
    assert "only n=1 is supported" in raised.value.body["message"]
    assert raised.value.body["param"] == "n"


def test_models_lists_bundle_name(client):
    models = client.models.list()

    assert [m.id for m in models.data] == [demo_bundle().name]
    assert client.models.retrieve(demo_bundle().name).id == demo_bundle().name


def test_unknown_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("no-such-model")

    assert raised.value.body["param"] == "model"


def test_model_id_setting_reported(start_server):
    with start_server(model_id="my-model") as server, server.openai() as client:
        listed = [m.id for m in client.models.list().data]
        completion = client.completions.create(model="my-model", prompt=STORY_PROMPT, max_tokens=2)
        chat = client.chat.completions.create(model="my-model", messages=CHAT_MESSAGES, max_tokens=2)
        with server.client() as http:
            health = http.get("/health").json()

    assert listed == ["my-model"]
    assert completion.model == "my-model"
    assert chat.model == "my-model"
    assert health["model"] == "my-model"


# ---------------------------------------------------------------- request semantics (httpx)


def test_unknown_fields_ignored(http):
    body = {"prompt": STORY_PROMPT, "max_tokens": 3, "temperature": 0, "logit_bias": {"5": 1},
            "no_such_field": [1, 2], "metadata": {"a": "b"}}
    response = http.post("/v1/completions", json=body)

    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("field, value, received", [
    ("temperature", 3, "3"),
    ("top_p", 0, "0"),
    ("max_tokens", 0, "0"),
    ("presence_penalty", 5, "5"),
    ("frequency_penalty", -2.5, "-2.5"),
    ("seed", -1, "-1"),
    ("max_tokens", "ten", '"ten"'),
    ("temperature", "hot", '"hot"'),
    ("stream", "maybe", '"maybe"'),
    ("stop", ["a", "b", "c", "d", "e"], "5"),
    ("stop", 5, "5"),
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_invalid_field_rejected(http, route, field, value, received):
    if route == "/v1/chat/completions":
        body = {"messages": CHAT_MESSAGES, "max_tokens": 3}
    else:
        body = {"prompt": STORY_PROMPT, "max_tokens": 3}
    if route == "/generate" and field == "temperature" and value == 3:
        value, received = 101, "101"  # /generate accepts temperatures up to 100
    response = http.post(route, json={**body, field: value})

    error = assert_error_shape(response, 400)
    assert error["param"] == field
    assert received in error["message"]
    assert error["type"] == "invalid_request_error"


def test_invalid_message_role_rejected(http):
    response = http.post("/v1/chat/completions",
                         json={"messages": [{"role": "robot", "content": "hi"}], "max_tokens": 2})

    error = assert_error_shape(response, 400)
    assert error["param"].startswith("messages")
    assert '"robot"' in error["message"]


def test_empty_messages_rejected(http):
    response = http.post("/v1/chat/completions", json={"messages": [], "max_tokens": 2})

    error = assert_error_shape(response, 400)
    assert error["param"] == "messages"


def test_malformed_json_rejected(http):
    response = http.post("/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})

    error = assert_error_shape(response, 400)
    assert error["param"] is None
    assert "JSON" in error["message"]


def test_context_overflow_names_numbers(http):
    response = http.post("/v1/completions", json={"prompt": STORY_PROMPT, "max_tokens": 600})

    error = assert_error_shape(response, 400)
    assert error["param"] == "max_tokens"
    assert error["code"] == "context_length_exceeded"
    assert "5" in error["message"]  # prompt tokens
    assert "600" in error["message"]
    assert str(CONTEXT_TOKENS) in error["message"]


def test_prompt_filling_context_rejected(http):
    response = http.post("/v1/completions", json={"prompt": "dog " * 600, "max_tokens": 1})

    error = assert_error_shape(response, 400)
    assert error["param"] == "prompt"
    assert str(CONTEXT_TOKENS) in error["message"]


def test_omitted_max_tokens_fills_context(http):
    response = http.post("/v1/completions", json={"prompt": LONG_PROMPT, "temperature": 0})

    assert response.status_code == 200, response.text
    body = response.json()
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert 480 <= prompt_tokens < CONTEXT_TOKENS  # precondition: the prompt leaves a short tail
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == CONTEXT_TOKENS - prompt_tokens


def test_unknown_route_not_found(http):
    error = assert_error_shape(http.get("/v1/no-such-route"), 404)

    assert "/v1/no-such-route" in error["message"]


def test_wrong_method_not_allowed(http):
    response = http.get("/v1/chat/completions")

    error = assert_error_shape(response, 405)
    assert "GET" in error["message"]
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_stream_ends_with_done(http, route):
    if route == "/v1/chat/completions":
        body = {"messages": CHAT_MESSAGES}
    else:
        body = {"prompt": STORY_PROMPT}
    with http.stream("POST", route, json={**body, "max_tokens": 5, "stream": True}) as response:
        payloads = sse_events(response)
        content_type = response.headers["content-type"]

    assert content_type.startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    assert all(isinstance(event, dict) for event in sse_json(payloads))


def test_generate_stream_ends_with_whole_body(http):
    body = {"prompt": STORY_PROMPT, "max_tokens": 12, "temperature": 0}
    whole = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        events = sse_json(sse_events(response))

    assert events[-1]["done"] is True
    assert events[-1]["text"] == whole["text"]
    assert events[-1]["token_ids"] == whole["token_ids"]
    assert "".join(e["text"] for e in events[:-1]) == whole["text"]


def test_completion_echo_prepends_prompt(http):
    body = {"prompt": STORY_PROMPT, "max_tokens": 6, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()
    echoed = http.post("/v1/completions", json={**body, "echo": True}).json()

    assert echoed["choices"][0]["text"] == STORY_PROMPT + plain["choices"][0]["text"]


def test_chat_content_parts_accepted(http):
    parts = [{"type": "text", "text": "Tell me a story "}, {"type": "text", "text": "about a dog."}]
    as_parts = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                       "max_tokens": 8, "temperature": 0})
    as_text = http.post("/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "Tell me a story about a dog."}],
                              "max_tokens": 8, "temperature": 0})

    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]
    assert json.dumps(as_parts.json()["usage"]) == json.dumps(as_text.json()["usage"])


def test_completion_prompt_list_accepted(http):
    response = http.post("/v1/completions", json={"prompt": [STORY_PROMPT], "max_tokens": 2, "temperature": 0})

    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_completion_token_ids_accepted(http):
    response = http.post("/v1/completions", json={"prompt": [0, 390, 394], "max_tokens": 2, "temperature": 0})

    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("logprobs", True),
    ("response_format", {"type": "json_object"}),
])
def test_unsupported_chat_feature_rejected(http, field, value):
    response = http.post("/v1/chat/completions", json={"messages": CHAT_MESSAGES, "max_tokens": 2, field: value})

    error = assert_error_shape(response, 400)
    assert error["param"] == field
    assert "not supported" in error["message"]


def test_image_content_rejected(http):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    response = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})

    error = assert_error_shape(response, 400)
    assert "only text" in error["message"]


def test_generate_default_max_tokens_fits_context(http):
    # 500 prompt tokens leave 12 of the 512-token context: the default of 128 shrinks to fit.
    prompt = " dog" * 499
    response = http.post("/generate", json={"prompt": prompt, "temperature": 0})

    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == 500
    assert usage["completion_tokens"] <= 512 - usage["prompt_tokens"]
