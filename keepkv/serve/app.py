"""The HTTP routes of ``keepkv serve`` (FastAPI): OpenAI's completions, chat completions and models, plus health.

- ``POST /v1/completions`` and ``POST /v1/chat/completions``: checked by :mod:`keepkv.serve.protocol`, queued on
  the :class:`~keepkv.serve.scheduler.BatchScheduler`; with ``"stream": true`` the answer is server-sent events
  in OpenAI's chunk format (``data: {chunk}`` lines, then ``data: [DONE]``), else one JSON object with ``usage``;
- ``GET /v1/models``: the served model (id, context, cache method and budget);
- ``GET /health``: ``{"status": "ok", ...}`` with the scheduler's counters (``slots_in_use``, ``queued``, ...).

Every refusal is OpenAI's error object (:func:`keepkv.serve.protocol.error_body`). A streaming client that
disconnects cancels its jobs (the response generator is cancelled and its ``finally`` frees the slot); a
non-streaming one is noticed within :data:`DISCONNECT_POLL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from keepkv.models.language_model import LanguageModel
from keepkv.serve.engine import BatchEngine
from keepkv.serve.protocol import ParsedRequest, RequestError, error_body, parse_chat, parse_completion
from keepkv.serve.scheduler import BatchScheduler, Event, Job
from keepkv.serve.variants import ModelVariants

DISCONNECT_POLL_SECONDS = 0.5


def create_app(model: LanguageModel, *, max_batch: int = 8, batch_window: float = 0.02, max_variants: int = 4,
               model_id: str | None = None, engine: Callable[[ModelVariants], BatchEngine] | None = None) -> FastAPI:
    """The ASGI app serving ``model`` (loaded once by the caller). The batching worker starts and stops with the
    app's lifespan; ``app.state.scheduler`` exposes it (tests read ``slots_in_use``). ``engine`` builds the
    worker's :class:`~keepkv.serve.engine.BatchEngine` from the variants (default: this process's
    :class:`~keepkv.serve.engine.LocalBatchEngine`; ``--tp``: :class:`~keepkv.serve.lockstep.LockstepEngine`)."""
    variants = ModelVariants(model, max_variants)
    scheduler = BatchScheduler(variants, max_batch=max_batch, batch_window=batch_window,
                               engine=engine(variants) if engine is not None else None)
    model_id = model_id or model.name
    context = model.config.max_position_embeddings
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="keepkv", lifespan=lifespan)
    app.state.scheduler, app.state.variants, app.state.model_id = scheduler, variants, model_id

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(err), type=err.type, param=err.param, code=err.code), err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {err.errors()}", code="invalid_body"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), type=kind), err.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "method": model.method, "kv_budget": model.kv_budget,
                "slots_in_use": scheduler.slots_in_use, "queued": scheduler.queued,
                "running_rows": scheduler.running_rows, "batches": scheduler.batches, "max_batch": max_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": created, "owned_by": "keepkv", "context_length": context,
            "method": model.method, "kv_budget": model.kv_budget}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = parse_completion(await _json(request), model_id, model.tokenizer, context, variants)
        return await _respond(request, parsed, scheduler, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = parse_chat(await _json(request), model_id, model.tokenizer, context, variants)
        return await _respond(request, parsed, scheduler, chat=True)

    return app


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}", code="invalid_json") from None


def _submit(parsed: ParsedRequest, scheduler: BatchScheduler) -> list[tuple[Job, asyncio.Queue]]:
    loop = asyncio.get_running_loop()
    submitted = []
    for spec in parsed.jobs:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job = scheduler.submit(spec, lambda event, q=queue: loop.call_soon_threadsafe(q.put_nowait, event))
        submitted.append((job, queue))
    return submitted


def _usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(len(job.spec.prompt_ids) for job in jobs)
    completion = sum(job.completion_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(request: Request, parsed: ParsedRequest, scheduler: BatchScheduler, *, chat: bool):
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    submitted = _submit(parsed, scheduler)
    if parsed.stream:
        return StreamingResponse(_events(submitted, parsed, scheduler, request_id, created, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        choices = []
        for index, (job, queue) in enumerate(submitted):
            text, finish = [], None
            while finish is None:
                try:
                    event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse(error_body("client disconnected"), 499)
                    continue
                if event.error is not None:
                    return JSONResponse(error_body(event.error, type="server_error"), 500)
                text.append(event.text)
                finish = event.finish_reason
            content = "".join(text)
            choices.append({"index": index, "message": {"role": "assistant", "content": content},
                            "logprobs": None, "finish_reason": finish} if chat else
                           {"index": index, "text": content, "logprobs": None, "finish_reason": finish})
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": parsed.model, "choices": choices, "usage": _usage([job for job, _ in submitted])}
    finally:
        for job, _ in submitted:
            if not job.done:
                scheduler.cancel(job)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _events(submitted: list[tuple[Job, asyncio.Queue]], parsed: ParsedRequest, scheduler: BatchScheduler,
                  request_id: str, created: int, chat: bool) -> AsyncIterator[str]:
    """OpenAI's streaming chunks; cancelled by Starlette when the client disconnects (``finally`` frees slots)."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({"id": request_id, "object": kind, "created": created, "model": parsed.model,
                     "choices": [choice]})

    try:
        for index, (job, queue) in enumerate(submitted):
            if chat:
                yield chunk(index, None, None, role=True)
            while True:
                event = await queue.get()
                if event.error is not None:
                    yield _sse(error_body(event.error, type="server_error"))
                    return
                if event.text:
                    yield chunk(index, event.text, None)
                if event.finish_reason is not None:
                    yield chunk(index, None if chat else "", event.finish_reason)
                    break
        if parsed.include_usage:
            yield _sse({"id": request_id, "object": kind, "created": created, "model": parsed.model,
                        "choices": [], "usage": _usage([job for job, _ in submitted])})
        yield _sse("[DONE]")
    finally:
        for job, _ in submitted:
            if not job.done:
                scheduler.cancel(job)
