"""FastAPI application: the model loads in the background so /health answers 503 until ready."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from edgemoe.runtime.loading import load_model
from edgemoe.server import native
from edgemoe.server.errors import install_error_handlers
from edgemoe.server.worker import GenerationWorker

logger = logging.getLogger(__name__)


def create_app(bundle: str | None = None, expert_budget: str | None = None, threads: int = 0,
               verify: bool = True) -> FastAPI:
    """Build the app; the model at `bundle` (None: the demo model) loads after startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load():
            try:
                model = await asyncio.to_thread(load_model, bundle, expert_budget, threads, verify)
            except Exception as exc:  # reported by /health, the server keeps running
                logger.error("failed to load the model: %s", exc)
                app.state.load_error = str(exc)
                return
            app.state.model_id = model.bundle.name
            app.state.worker = GenerationWorker(model)
            logger.info("model %s ready", app.state.model_id)

        task = asyncio.create_task(load())
        yield
        task.cancel()
        if app.state.worker is not None:
            app.state.worker.close()

    app = FastAPI(title="edgemoe", lifespan=lifespan)
    app.state.worker = None
    app.state.load_error = None
    app.state.model_id = None
    install_error_handlers(app)
    app.include_router(native.router)
    return app
