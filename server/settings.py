"""Server settings: every field has a command-line flag and an `EDGEMOE_<FIELD>` environment twin."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEMOE_", extra="ignore")

    bundle: str | None = Field(None, description="bundle directory; None serves the built-in demo model")
    expert_budget: str | None = Field(None, description="expert budget: size, percentage or auto")
    threads: int = Field(0, ge=0, description="threads per dense session; 0 picks min(4, cores)")
    verify: bool = Field(True, description="check sha256 of bundle files before first use")
    eviction: str = Field("lru", pattern="^(lru|lfu|edgemoe)$", description="expert eviction policy")
    predictor: str = Field("auto", pattern="^(auto|frequency|table|lookahead|combined|none)$",
                           description="predictor of the next layer's experts")
    preload: bool = Field(True, description="load predicted experts on the I/O thread")
    preload_depth: int = Field(1, ge=1, le=8, description="layers ahead to preload")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    model_id: str | None = Field(None, description="model id in /v1/models; default: the bundle's name")
    api_key: str | None = Field(None, description="Bearer token required on every route but /health")
    queue_size: int = Field(8, ge=1, le=1024, description="requests waiting behind the running one")
    request_timeout: float = Field(300.0, gt=0, description="seconds one request may generate")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest accepted request body")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest accepted prompt; default: context window")
    # NoDecode: the environment variable is a comma-separated list, not JSON.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                         description="origins allowed by CORS; empty disables CORS")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value
