"""Rendering chat messages with the model's chat template (jinja2, as transformers does) and
tokenizing the result so that only the template's own markup becomes special tokens.

Message contents are replaced by sentinels while rendering; the rendered text is then split at
the sentinels, template parts are encoded with special-token parsing and content parts as plain
text. A user who types "<|endoftext|>" gets the characters, never the token.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgemoe.runtime.tokenizer import BundleTokenizer

logger = logging.getLogger(__name__)

# Used when tokenizer_config.json has no chat_template: plain "User:" / "Assistant:" turns.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'developer'] %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_SENTINEL = "\x00edgemoe-content-{}\x00"
_SENTINEL_RE = re.compile("\x00edgemoe-content-(\\d+)\x00")


class ChatTemplateError(ValueError):
    """The chat template failed to render these messages."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template rejected the messages: {message}")


def _token_text(value) -> str:
    if isinstance(value, dict):  # tokenizer_config may store {"content": "<s>", ...}
        return value.get("content", "")
    return value or ""


@dataclass
class ChatPrompt:
    token_ids: list[int]
    text: str  # rendered template, for logs at debug level


class ChatTemplate:
    def __init__(self, tokenizer: BundleTokenizer):
        self.tokenizer = tokenizer
        config = tokenizer.config
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.is_fallback = not template
        self.source = FALLBACK_TEMPLATE if self.is_fallback else template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(self.source)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        logger.info("chat template: %s", "fallback (User:/Assistant: turns; the model has none)"
                    if self.is_fallback else "from tokenizer_config.json")

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> ChatPrompt:
        """Render and tokenize `messages` ({"role", "content"} dicts).

        Raises:
            ChatTemplateError: the template raised or failed to render.
        """
        masked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        try:
            rendered = self.template.render(messages=masked, add_generation_prompt=add_generation_prompt,
                                            bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed to render: {exc}") from exc

        ids: list[int] = []
        text_parts: list[str] = []
        position = 0
        for match in _SENTINEL_RE.finditer(rendered):
            markup = rendered[position:match.start()]
            content = messages[int(match.group(1))]["content"]
            ids += self.tokenizer.encode_markup(markup)
            ids += self.tokenizer.encode(content, add_special_tokens=False)
            text_parts += [markup, content]
            position = match.end()
        ids += self.tokenizer.encode_markup(rendered[position:])
        text_parts.append(rendered[position:])
        return ChatPrompt(token_ids=ids, text="".join(text_parts))
