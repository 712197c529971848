"""Request and response bodies of the native routes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GenerateRequest(BaseModel):
    prompt: str = Field(description="prompt text; special-token markup in it is encoded as text")
    max_tokens: int = Field(128, ge=1, description="maximum generated tokens")
    temperature: float = Field(0.8, ge=0.0, le=100.0, description="0 is greedy")
    top_k: int = Field(40, ge=0, description="sample from the K most likely tokens; 0 disables")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling mass; 1 disables")
    seed: int | None = Field(None, ge=0, lt=2**63, description="random seed")


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
