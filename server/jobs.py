"""Turning a validated request into a worker job, and consuming its events whole or as a stream.

Both paths watch the client: a disconnect cancels the job, which frees the worker before its
next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import Request

from edgemoe.runtime.generation import GenerationEvent, GenerationResult
from edgemoe.runtime.sampling import SamplingParams
from edgemoe.server.errors import ApiError
from edgemoe.server.worker import END, Job, QueueFullError, next_event

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.1


def check_length(request: Request, prompt_tokens: int, max_tokens: int | None) -> int:
    """Return the max_tokens to use, or raise a 400 ApiError that names both numbers."""
    state = request.app.state
    context = state.worker.model.engine.context_length
    limit = state.settings.max_prompt_tokens
    if limit is not None and prompt_tokens > limit:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this server accepts at most {limit} "
                            "(--max-prompt-tokens)", param="prompt", code="prompt_too_long")
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens but the context window is {context} "
                            "tokens; shorten the prompt", param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        return context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise ApiError(400, f"prompt tokens ({prompt_tokens}) + max_tokens ({max_tokens}) = "
                            f"{prompt_tokens + max_tokens} exceed the context window of {context} tokens; "
                            f"lower max_tokens to at most {context - prompt_tokens}",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def submit(request: Request, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
           stop: list[str]) -> Job:
    """Queue a job for this request, or raise a 503 ApiError with Retry-After when the queue is full."""
    state = request.app.state
    try:
        params.validate()
    except ValueError as exc:
        raise ApiError(400, str(exc), param=str(exc).split(" ", 1)[0], code="invalid_value") from None
    job = Job(request_id=getattr(request.state, "request_id", uuid.uuid4().hex[:12]), prompt_ids=prompt_ids,
              max_tokens=max_tokens, params=params, stop=stop, timeout=state.settings.request_timeout,
              loop=asyncio.get_running_loop(), on_done=state.record_finish)
    request.state.prompt_tokens = len(prompt_ids)
    try:
        state.worker.submit(job)
    except QueueFullError as exc:
        raise ApiError(503, str(exc), code="queue_full", headers={"Retry-After": "2"}) from None
    return job


class _Timer:
    """Time to first token and time between tokens, reported to the metrics."""

    def __init__(self, request: Request):
        self.metrics = request.app.state.metrics
        self.started = getattr(request.state, "started", time.perf_counter())
        self.last: float | None = None

    def token(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.started)
        else:
            self.metrics.time_per_token.observe(now - self.last)
        self.last = now


async def collect(request: Request, job: Job) -> GenerationResult | None:
    """Wait for the job's result; None when the client disconnected (the job is cancelled)."""
    timer = _Timer(request)
    result = None
    getter = asyncio.ensure_future(next_event(job))
    next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_SECONDS)
            # Poll on a timer, not only when no event came: a fast model delivers tokens more
            # often than every poll interval, and the disconnect would then go unnoticed.
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
                if await request.is_disconnected():
                    logger.info("request %s: client disconnected, cancelling", job.request_id)
                    job.cancel.set()
                    return None
            if not done:
                continue
            try:
                item = getter.result()
            except Exception as exc:  # the worker's error, logged there with its traceback
                # FastAPI's exception middleware turns an ApiError into its response. A plain
                # exception would reach Starlette's ServerErrorMiddleware, which re-raises it after
                # sending the 500, and uvicorn then closes the keep-alive connection under the
                # client's next request.
                raise ApiError(500, f"generation failed: {exc}", code="internal_error") from exc
            if item is END:
                return result
            getter = asyncio.ensure_future(next_event(job))
            if item.result is not None:
                result = item.result
            elif item.token_id is not None:
                timer.token()
    finally:
        getter.cancel()
        if result is None:
            job.cancel.set()


async def events(request: Request, job: Job) -> AsyncIterator[GenerationEvent]:
    """Yield the job's events as they come; closing the iterator (disconnect) cancels the job."""
    timer = _Timer(request)
    finished = False
    try:
        while True:
            item = await next_event(job)
            if item is END:
                finished = True
                return
            if item.token_id is not None:
                timer.token()
            yield item
    finally:
        if not finished:
            logger.info("request %s: stream closed by the client, cancelling", job.request_id)
        job.cancel.set()


def usage(result: GenerationResult) -> dict:
    s = result.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens}


async def close_quietly(iterator) -> None:
    with contextlib.suppress(Exception):
        await iterator.aclose()
