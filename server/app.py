"""FastAPI application assembly. The model loads in the background after start-up, so
`/health` answers 503 until it is ready."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgemoe.runtime.budget import format_bytes
from edgemoe.runtime.chat_template import ChatTemplate
from edgemoe.runtime.loading import load_model
from edgemoe.server import native, openai_routes
from edgemoe.server.errors import install_error_handlers
from edgemoe.server.metrics import ServerMetrics
from edgemoe.server.middleware import RequestGuard
from edgemoe.server.settings import ServerSettings
from edgemoe.server.worker import GenerationWorker

logger = logging.getLogger(__name__)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """Build the app for `settings` (default: from EDGEMOE_* environment variables)."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_load(app, settings))
        yield
        task.cancel()
        if app.state.worker is not None:
            app.state.worker.close()
        logger.info("server stopped")

    app = FastAPI(title="edgemoe", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.worker = None
    app.state.load_error = None
    app.state.model_id = settings.model_id
    app.state.created = int(time.time())
    app.state.chat_template = None
    app.state.metrics = ServerMetrics(app.state)
    app.state.record_finish = lambda job, reason: app.state.metrics.generations.labels(finish_reason=reason).inc()

    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(openai_routes.router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request):
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # Request metrics label known routes by path and everything else as "other", so that
    # scanners requesting random paths cannot grow the label set.
    known = {route.path for router in (native.router, openai_routes.router) for route in router.routes}
    known.add("/metrics")
    app.add_middleware(RequestGuard, settings=settings, metrics=app.state.metrics, known_paths=known)
    # Added last, so outermost: RequestGuard's 401 and 413 responses get CORS headers too.
    # Without them a browser reports a CORS failure instead of the error.
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


async def _load(app: FastAPI, settings: ServerSettings) -> None:
    try:
        predictor = None if settings.predictor == "none" else settings.predictor
        model = await asyncio.to_thread(
            load_model, settings.bundle, settings.expert_budget, settings.threads, settings.verify,
            eviction=settings.eviction, predictor=predictor, preload=settings.preload and predictor is not None,
            preload_depth=settings.preload_depth)
        app.state.chat_template = ChatTemplate(model.tokenizer)
    except Exception as exc:  # reported by /health; the server keeps answering
        logger.error("failed to load the model: %s", exc)
        app.state.load_error = str(exc)
        return
    app.state.model_id = settings.model_id or model.bundle.name
    app.state.worker = GenerationWorker(model, settings.queue_size)
    logger.info("model %s ready: %s, expert budget %s, queue %d, bind %s:%d", app.state.model_id,
                model.manifest.architecture, format_bytes(model.engine.store.budget_bytes),
                settings.queue_size, settings.host, settings.port)
