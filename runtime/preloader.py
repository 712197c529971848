"""The I/O thread: loads predicted experts while the compute thread runs the current layer.

Each new prediction replaces the queue: predictions for a layer that has started are stale (the
compute thread loads what it needs itself), and a fresher prediction of the same layer wins.
Loading happens in onnxruntime session creation, which releases the GIL.
"""

from __future__ import annotations

import logging
import threading

from edgemoe.runtime.eviction import ExpertKey
from edgemoe.runtime.expert_store import ExpertStore

logger = logging.getLogger(__name__)


class Preloader:
    def __init__(self, store: ExpertStore):
        self.store = store
        self._queue: list[ExpertKey] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgemoe-preload", daemon=True)
        self._thread.start()

    def request(self, keys: list[ExpertKey]) -> None:
        """Replace pending preloads with `keys`, most wanted first."""
        wanted = [k for k in keys if not self.store.is_available(k)]
        with self._cond:
            self._queue = wanted
            # Waking the thread costs a GIL hand-over, so only wake it when there is work.
            if wanted:
                self._cond.notify()

    def cancel(self) -> None:
        """Drop pending preloads (a load already running completes)."""
        with self._cond:
            self._queue = []

    def idle(self) -> bool:
        with self._cond:
            return not self._queue

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the load in progress, if any."""
        with self._cond:
            self._stopping = True
            self._queue = []
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the preload thread did not stop within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                key = self._queue.pop(0)
            try:
                self.store.preload(key)
            except Exception:  # never let the I/O thread die; the demand path reports load errors
                logger.exception("preloading expert %d of layer %d failed", key[1], key[0])
