"""The generation worker: one thread owns the model, because decode is batch 1 on a device.

Requests run one at a time in arrival order; onnxruntime releases the GIL, so the event loop
keeps serving /health while a request generates.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from edgemoe.runtime.generation import GenerationResult
from edgemoe.runtime.loading import LoadedModel
from edgemoe.runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)


class GenerationWorker:
    def __init__(self, model: LoadedModel):
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgemoe-generate")
        self._lock = threading.Lock()

    def _generate(self, prompt: str, max_tokens: int, params: SamplingParams) -> GenerationResult:
        with self._lock:
            prompt_ids = self.model.tokenizer.encode(prompt)
            return self.model.generator.generate(prompt_ids, max_tokens, params)

    async def generate(self, prompt: str, max_tokens: int, params: SamplingParams) -> GenerationResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate, prompt, max_tokens, params)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
