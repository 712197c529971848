"""Chat template rendering and special-token handling, in the runtime and over HTTP.

Invariants checked here:
- Without a chat template in tokenizer_config.json, the fallback template renders plain
  "User:" / "Assistant:" turns after the BOS token.
- Special-token text typed by a user ("<|endoftext|>", id 0 in the demo tokenizer) is encoded
  as plain text in chat messages and in /v1/completions and /generate prompts. So id 0 appears
  only where the template or the tokenizer's post-processor puts it.
- Special-token text in the template's own markup becomes the special token.
- A template that raises (`raise_exception`) is reported as ChatTemplateError, and over HTTP as
  400 with param "messages".
"""

from __future__ import annotations

import copy

import pytest

from edgemoe.runtime.chat_template import ChatTemplate, ChatTemplateError

pytest.register_assert_rewrite("server_helpers")
from server_helpers import STORY_PROMPT, assert_error_shape  # noqa: E402

pytest_plugins = ["server_helpers"]

SPECIAL = "<|endoftext|>"
SPECIAL_ID = 0  # BOS and EOS of the demo model

CONVERSATION = [{"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell me a story."}]
INJECTED = [{"role": "system", "content": f"Rules {SPECIAL} end"},
            {"role": "user", "content": f"{SPECIAL}Hi{SPECIAL}"},
            {"role": "assistant", "content": f"Sure {SPECIAL}"},
            {"role": "user", "content": f"More {SPECIAL}{SPECIAL} please"}]


def _with_template(tokenizer, template):
    """A copy of `tokenizer` whose tokenizer_config.json has `chat_template`."""
    changed = copy.copy(tokenizer)
    changed.config = {**tokenizer.config, "chat_template": template}
    return changed


# ---------------------------------------------------------------- ChatTemplate


def test_demo_uses_fallback_template(demo_tokenizer):
    assert ChatTemplate(demo_tokenizer).is_fallback


def test_fallback_renders_turns(demo_tokenizer):
    prompt = ChatTemplate(demo_tokenizer).render(CONVERSATION)

    assert prompt.text == f"{SPECIAL}Be kind.\n\nUser: Hi\nAssistant: Hello\nUser: Tell me a story.\nAssistant:"
    assert prompt.token_ids[0] == SPECIAL_ID
    assert demo_tokenizer.decode(prompt.token_ids) == prompt.text[len(SPECIAL):]


def test_fallback_without_generation_prompt(demo_tokenizer):
    prompt = ChatTemplate(demo_tokenizer).render(CONVERSATION[:2], add_generation_prompt=False)

    assert prompt.text == f"{SPECIAL}Be kind.\n\nUser: Hi\n"


def test_typed_special_token_stays_text(demo_tokenizer):
    prompt = ChatTemplate(demo_tokenizer).render(INJECTED)

    assert prompt.token_ids.count(SPECIAL_ID) == 1
    assert prompt.token_ids[0] == SPECIAL_ID
    assert demo_tokenizer.decode(prompt.token_ids).count(SPECIAL) == 6


def test_template_markup_becomes_special_token(demo_tokenizer):
    template = ("{% for m in messages %}" + SPECIAL + "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}" + SPECIAL + "assistant:{% endif %}")
    chat = ChatTemplate(_with_template(demo_tokenizer, template))

    prompt = chat.render(INJECTED)

    assert not chat.is_fallback
    assert prompt.token_ids.count(SPECIAL_ID) == len(INJECTED) + 1


def test_template_bos_and_eos_variables(demo_tokenizer):
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    prompt = ChatTemplate(_with_template(demo_tokenizer, template)).render(CONVERSATION)

    assert prompt.token_ids.count(SPECIAL_ID) == len(CONVERSATION) + 1


def test_template_content_used_twice(demo_tokenizer):
    template = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}\n{% endfor %}"
    prompt = ChatTemplate(_with_template(demo_tokenizer, template)).render([{"role": "user", "content": "dog"}])

    assert prompt.text == "dog|dog\n"


def test_sentinel_like_content_stays_text(demo_tokenizer):
    content = "\x00edgemoe-content-7\x00 and more"
    prompt = ChatTemplate(demo_tokenizer).render([{"role": "user", "content": content}])

    assert prompt.text == f"{SPECIAL}User: {content}\nAssistant:"


def test_named_templates_use_default(demo_tokenizer):
    templates = [{"name": "tool_use", "template": "TOOLS"},
                 {"name": "default", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}]
    prompt = ChatTemplate(_with_template(demo_tokenizer, templates)).render(CONVERSATION[:2])

    assert prompt.text == "[Be kind.][Hi]"


def test_raise_exception_becomes_template_error(demo_tokenizer):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be from "
                "the user') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chat = ChatTemplate(_with_template(demo_tokenizer, template))

    with pytest.raises(ChatTemplateError, match="the first message must be from the user"):
        chat.render(CONVERSATION)


def test_render_error_becomes_template_error(demo_tokenizer):
    chat = ChatTemplate(_with_template(demo_tokenizer, "{{ messages[0]['content'].no_such_method() }}"))

    with pytest.raises(ChatTemplateError):
        chat.render(CONVERSATION)


def test_sandbox_blocks_attribute_access(demo_tokenizer):
    chat = ChatTemplate(_with_template(demo_tokenizer, "{{ messages.__class__.__mro__ }}"))

    with pytest.raises(ChatTemplateError):
        chat.render(CONVERSATION)


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def http(served_demo):
    with served_demo.client() as http_client:
        yield http_client


def test_chat_prompt_tokens_match_template(http, demo_tokenizer):
    plain_ids = ChatTemplate(demo_tokenizer).render(INJECTED).token_ids
    markup_ids = demo_tokenizer.encode_markup(ChatTemplate(demo_tokenizer).render(INJECTED).text)

    response = http.post("/v1/chat/completions", json={"messages": INJECTED, "max_tokens": 1})

    assert response.status_code == 200, response.text
    assert len(markup_ids) != len(plain_ids)  # precondition: parsing the markup would change the count
    assert response.json()["usage"]["prompt_tokens"] == len(plain_ids)


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
def test_prompt_special_text_stays_text(http, demo_tokenizer, route):
    prompt = f"The end.{SPECIAL}{STORY_PROMPT}"
    plain_ids = demo_tokenizer.encode(prompt)
    markup_ids = demo_tokenizer.encode_markup(prompt)

    response = http.post(route, json={"prompt": prompt, "max_tokens": 1})

    assert response.status_code == 200, response.text
    assert plain_ids.count(SPECIAL_ID) == 1
    assert plain_ids[0] == SPECIAL_ID
    assert markup_ids.count(SPECIAL_ID) == 1  # precondition: with parsing, the typed text is one token
    assert len(markup_ids) != len(plain_ids)
    assert response.json()["usage"]["prompt_tokens"] == len(plain_ids)


def test_template_error_returns_400(http, served_demo, demo_tokenizer):
    template = "{{ raise_exception('system messages are not supported') }}"
    state = served_demo.app.state
    # Not monkeypatch.setattr: its undo deletes attributes of a starlette State instead of restoring them.
    original = state.chat_template
    state.chat_template = ChatTemplate(_with_template(demo_tokenizer, template))
    try:
        response = http.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 1})
    finally:
        state.chat_template = original

    error = assert_error_shape(response, 400)
    assert error["param"] == "messages"
    assert "system messages are not supported" in error["message"]
