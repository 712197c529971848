"""The generation worker: one thread owns the model (decode is batch 1 on a device) and serves
jobs from a bounded FIFO queue.

A job streams `GenerationEvent`s back to the event loop through an asyncio queue and ends with
the `END` sentinel. A failing job delivers its exception and the worker goes on with the next.
Cancelling a job (client gone) stops it before its next token; a cancelled job still waiting in
the queue is skipped when its turn comes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from edgemoe.runtime.generation import GenerationEvent
from edgemoe.runtime.loading import LoadedModel
from edgemoe.runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)

END = object()  # last item of every job's event stream


class QueueFullError(Exception):
    """The queue already holds `queue_size` waiting requests."""


@dataclass
class Job:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    timeout: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[["Job", str], None] | None = None  # called with the finish reason or "error"

    def deliver(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class GenerationWorker:
    def __init__(self, model: LoadedModel, queue_size: int):
        self.model = model
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="edgemoe-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            QueueFullError: `queue_size` jobs are already waiting.
        """
        with self._lock:
            if self._waiting >= self.queue_size:
                raise QueueFullError(f"the queue is full ({self.queue_size} requests waiting, "
                                     "--queue-size); retry later")
            self._waiting += 1
        self._queue.put(job)

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the running job; waiting jobs are cancelled."""
        with self._lock:
            pending = list(self._queue.queue)
        for job in pending:
            if job is not None:
                job.cancel.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self.model.engine.close()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            if job.cancel.is_set():
                logger.info("request %s cancelled while queued", job.request_id)
                self._finish(job, "cancelled")
                job.deliver(END)
                continue
            self.busy = True
            try:
                self._generate(job)
            finally:
                self.busy = False

    def _generate(self, job: Job) -> None:
        deadline = time.monotonic() + job.timeout
        reason = "error"
        try:
            for event in self.model.generator.stream(job.prompt_ids, job.max_tokens, job.params, stop=job.stop,
                                                     cancelled=job.cancel.is_set, deadline=deadline):
                if event.result is not None:
                    reason = event.result.finish_reason
                job.deliver(event)
        except Exception as exc:  # reported to this request only; the worker serves the next one
            logger.error("request %s failed during generation: %s", job.request_id, exc, exc_info=exc)
            job.deliver(exc)
        finally:
            self._finish(job, reason)
            job.deliver(END)

    @staticmethod
    def _finish(job: Job, reason: str) -> None:
        if job.on_done is not None:
            try:
                job.on_done(job, reason)
            except Exception:  # metrics must never break generation
                logger.exception("request %s: finish callback failed", job.request_id)


async def next_event(job: Job) -> GenerationEvent | object:
    """Wait for the next item of a job: a GenerationEvent, or END; re-raise a job's exception."""
    item = await job.events.get()
    if isinstance(item, Exception):
        raise item
    return item
