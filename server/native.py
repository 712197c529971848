"""Native routes: `POST /generate` (whole or streamed as server-sent events) and `GET /health`."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from edgemoe.runtime.generation import GenerationResult
from edgemoe.server import jobs
from edgemoe.server.errors import ApiError, error_body, error_response
from edgemoe.server.schemas import ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter()
DEFAULT_MAX_TOKENS = 128


def require_worker(request: Request):
    state = request.app.state
    if state.worker is None:
        if state.load_error:
            raise ApiError(503, f"the model failed to load: {state.load_error}; fix it and restart the server",
                           code="model_load_failed")
        raise ApiError(503, "the model is loading; retry when GET /health returns 200",
                       code="model_not_ready", headers={"Retry-After": "1"})
    return state.worker


@router.get("/health")
async def health(request: Request):
    state = request.app.state
    if state.worker is None:
        message = f"the model failed to load: {state.load_error}" if state.load_error else "the model is loading"
        return error_response(503, message, code="model_load_failed" if state.load_error else "model_not_ready")
    return {"status": "ok", "model": state.model_id}


def _native_body(result: GenerationResult) -> dict:
    s = result.stats
    return GenerateResponse(
        text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason,
        usage=jobs.usage(result),
        timings={"prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
                 "prefill_tokens_per_second": s.prefill_tokens_per_second,
                 "decode_tokens_per_second": s.decode_tokens_per_second},
        experts={"loads": s.expert_loads, "hits": s.cache_hits, "misses": s.cache_misses,
                 "bytes_read": s.bytes_read, "load_seconds": s.load_seconds,
                 "peak_resident_bytes": s.peak_resident_expert_bytes, "budget_bytes": s.expert_budget_bytes},
    ).model_dump()


@router.post("/generate", response_model=GenerateResponse,
             responses={400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def generate(body: GenerateRequest, request: Request):
    """Generate from a plain prompt. With `stream`, each event is `{"text", "token_id"}` and the
    last one before `[DONE]` is the whole response body with `"done": true`."""
    worker = require_worker(request)
    prompt_ids = worker.model.tokenizer.encode(body.prompt)
    max_tokens = body.max_tokens
    if max_tokens is None:
        # The documented default, shortened when the prompt leaves less room.
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, worker.model.engine.context_length - len(prompt_ids)))
    max_tokens = jobs.check_length(request, len(prompt_ids), max_tokens)
    job = jobs.submit(request, prompt_ids, max_tokens, body.sampling_params(), body.stop_list())
    if not body.stream:
        result = await jobs.collect(request, job)
        if result is None:
            return error_response(499, "client disconnected", code="cancelled")
        request.state.completion_tokens = result.stats.generated_tokens
        return _native_body(result)

    async def sse():
        try:
            async for event in jobs.events(request, job):
                if event.result is not None:
                    request.state.completion_tokens = event.result.stats.generated_tokens
                    yield f"data: {json.dumps({**_native_body(event.result), 'done': True})}\n\n"
                elif event.text:
                    yield f"data: {json.dumps({'text': event.text, 'token_id': event.token_id})}\n\n"
        except Exception as exc:  # the worker's error, after the stream began: report it in-band
            yield f"data: {json.dumps(error_body(500, f'generation failed: {exc}', code='internal_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
