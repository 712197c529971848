"""Native routes: `POST /generate` and `GET /health`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from edgemoe.runtime.engine import ContextLengthError
from edgemoe.runtime.sampling import SamplingParams
from edgemoe.server.errors import error_response
from edgemoe.server.schemas import ErrorResponse, GenerateRequest, GenerateResponse, Usage

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = request.app.state
    if state.worker is None:
        message = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
        return error_response(503, message, code="model_not_ready")
    return {"status": "ok", "model": state.model_id}


@router.post("/generate", response_model=GenerateResponse, responses={400: {"model": ErrorResponse}})
async def generate(body: GenerateRequest, request: Request):
    worker = request.app.state.worker
    if worker is None:
        return error_response(503, "model is loading; retry when GET /health returns 200",
                              code="model_not_ready", headers={"Retry-After": "1"})
    params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)
    try:
        result = await worker.generate(body.prompt, body.max_tokens, params)
    except ContextLengthError as exc:
        return error_response(400, str(exc), param="prompt", code="context_length_exceeded")
    s = result.stats
    return GenerateResponse(
        text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=s.prompt_tokens, completion_tokens=s.generated_tokens,
                    total_tokens=s.prompt_tokens + s.generated_tokens),
        timings={"prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
                 "prefill_tokens_per_second": s.prefill_tokens_per_second,
                 "decode_tokens_per_second": s.decode_tokens_per_second},
        experts={"loads": s.expert_loads, "hits": s.cache_hits, "misses": s.cache_misses,
                 "bytes_read": s.bytes_read, "load_seconds": s.load_seconds,
                 "peak_resident_bytes": s.peak_resident_expert_bytes, "budget_bytes": s.expert_budget_bytes})
