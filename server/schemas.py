"""Request and response bodies. Unknown request fields are ignored, as OpenAI's API does."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from edgemoe.runtime.sampling import SamplingParams


class SamplingFields(BaseModel):
    """Sampling and stopping fields shared by every generation route.

    Numbers and booleans are strict, as in OpenAI's API: "10" or true for max_tokens is a 400,
    not 10 or 1.
    """

    max_tokens: int | None = Field(None, strict=True, ge=1, description="maximum generated tokens")
    temperature: float = Field(1.0, strict=True, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, strict=True, gt=0.0, le=1.0)
    top_k: int = Field(0, strict=True, ge=0, description="0 disables")
    min_p: float = Field(0.0, strict=True, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, strict=True, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, strict=True, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, strict=True, gt=0.0, le=10.0)
    seed: int | None = Field(None, strict=True, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    stream: bool = Field(False, strict=True)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop strings are allowed, got {len(value)}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    model: str | None = None
    n: int = Field(1, strict=True, description="only 1 is supported")
    user: str | None = None
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, strict=True, ge=1)

    @field_validator("n")
    @classmethod
    def _check_n(cls, value):
        if value != 1:
            raise ValueError("only n=1 is supported (one completion per request)")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = ""

    def text(self) -> str:
        """The message text; list content keeps its `text` parts (images are not supported)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value):
        if not value:
            raise ValueError("messages is empty; send at least one message")
        for message in value:
            if isinstance(message.content, list) and any(p.get("type") != "text" for p in message.content):
                raise ValueError("only text content parts are supported (no images or audio)")
        return value

    @field_validator("logprobs", "tools")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by edgemoe; leave it out")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and value.get("type", "text") != "text":
            raise ValueError(f"response_format {value.get('type')!r} is not supported; only text")
        return value


class CompletionRequest(OpenAIFields):
    # OpenAI also accepts a list: one string, or one list of token ids, is served here.
    prompt: str | list[str] | list[int]
    echo: bool = Field(False, strict=True)
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError(f"only one prompt per request is supported, got a list of {len(value)}")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty; give a string")
        return value

    @field_validator("logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value not in (None, 0, ""):
            raise ValueError(f"{info.field_name} is not supported by edgemoe; leave it out")
        return value


class GenerateRequest(SamplingFields):
    prompt: str = Field(description="prompt text; special-token markup in it is encoded as text")
    max_tokens: int | None = Field(None, strict=True, ge=1,
                                   description="maximum generated tokens; default 128, or less when the "
                                               "context window has less room")
    temperature: float = Field(0.8, strict=True, ge=0.0, le=100.0)
    top_k: int = Field(40, strict=True, ge=0)
    top_p: float = Field(0.95, strict=True, gt=0.0, le=1.0)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: dict[str, float]
    experts: dict[str, int | float]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
