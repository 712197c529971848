"""OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from edgemoe.runtime.chat_template import ChatTemplateError
from edgemoe.server import jobs
from edgemoe.server.errors import ApiError, error_body, error_response
from edgemoe.server.native import require_worker
from edgemoe.server.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse

router = APIRouter(prefix="/v1")
_ERRORS = {400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@router.get("/models")
async def list_models(request: Request):
    require_worker(request)
    state = request.app.state
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                        "owned_by": "edgemoe"}]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, request: Request):
    require_worker(request)
    state = request.app.state
    if model_id != state.model_id:
        raise ApiError(404, f"model {model_id!r} not found; this server serves {state.model_id!r}",
                       param="model", code="model_not_found")
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "edgemoe"}


@router.post("/chat/completions", responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    worker = require_worker(request)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = request.app.state.chat_template.render(messages)
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), param="messages", code="invalid_messages") from None
    return await _complete(request, body, prompt.token_ids, chat=True)


@router.post("/completions", responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request):
    worker = require_worker(request)
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, list):  # token ids
        vocab = worker.model.manifest.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab}) (the vocabulary)", param="prompt",
                           code="invalid_value")
        prompt_ids, text = list(prompt), worker.model.tokenizer.decode(prompt)
    else:
        prompt_ids, text = worker.model.tokenizer.encode(prompt), prompt
    return await _complete(request, body, prompt_ids, chat=False, echo=text if body.echo else "")


async def _complete(request: Request, body, prompt_ids: list[int], chat: bool, echo: str = ""):
    max_tokens = jobs.check_length(request, len(prompt_ids), body.requested_max_tokens())
    job = jobs.submit(request, prompt_ids, max_tokens, body.sampling_params(), body.stop_list())
    model_id = request.app.state.model_id
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    base = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_id}

    if not body.stream:
        result = await jobs.collect(request, job)
        if result is None:
            return error_response(499, "client disconnected", code="cancelled")
        request.state.completion_tokens = result.stats.generated_tokens
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": echo + result.text, "finish_reason": result.finish_reason,
                      "logprobs": None}
        return {**base, "choices": [choice], "usage": jobs.usage(result)}

    chunk_object = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str | None, finish_reason: str | None, first: bool = False) -> str:
        if chat:
            if first:
                delta = {"role": "assistant", "content": ""}
            elif text:
                delta = {"content": text}
            else:
                delta = {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return f"data: {json.dumps({**base, 'object': chunk_object, 'choices': [choice]})}\n\n"

    async def sse():
        if chat:
            yield chunk(None, None, first=True)
        elif echo:
            yield chunk(echo, None)
        try:
            async for event in jobs.events(request, job):
                if event.result is not None:
                    request.state.completion_tokens = event.result.stats.generated_tokens
                    yield chunk(None, event.result.finish_reason)
                    if include_usage:
                        usage_chunk = {**base, "object": chunk_object, "choices": [],
                                       "usage": jobs.usage(event.result)}
                        yield f"data: {json.dumps(usage_chunk)}\n\n"
                elif event.text:
                    yield chunk(event.text, None)
        except Exception as exc:  # the worker's error, after the stream began: report it in-band
            yield f"data: {json.dumps(error_body(500, f'generation failed: {exc}', code='internal_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
