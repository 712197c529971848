"""The generation loop: prefill, decode one token at a time, sample, detokenize, stop."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from edgemoe.runtime.detokenizer import IncrementalDetokenizer
from edgemoe.runtime.engine import ContextLengthError, Engine
from edgemoe.runtime.sampling import Sampler, SamplingParams
from edgemoe.runtime.stats import peak_rss_bytes
from edgemoe.runtime.stop import StopStringMatcher
from edgemoe.runtime.tokenizer import BundleTokenizer


@dataclass
class GenerationStats:
    """Timings and expert-store counters of one generation."""

    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float  # over generated tokens after the first
    expert_loads: int
    cache_hits: int
    cache_misses: int
    bytes_read: int  # expert bytes read from storage
    load_seconds: float  # time spent creating expert sessions, on the compute and I/O threads
    stall_seconds: float  # time the compute thread waited for experts (demand loads, in-flight preloads)
    inflight_hits: int  # requests that found their expert being preloaded and waited for it
    preloads: int  # experts loaded by the I/O thread
    preloads_used: int  # preloaded experts requested before being evicted
    peak_resident_expert_bytes: int
    expert_budget_bytes: int
    peak_rss_bytes: int


@dataclass
class GenerationResult:
    """Outcome of one generation."""

    text: str
    token_ids: list[int]
    # "stop" (EOS or a stop string), "length" (max_tokens or context window full),
    # "time_limit" (deadline passed), "cancelled" (the caller gave up)
    finish_reason: str
    stats: GenerationStats

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationEvent:
    """One streamed step: the new token and the text it completes, or the final result."""

    token_id: int | None = None
    text: str = ""
    result: GenerationResult | None = field(default=None)


class Generator:
    def __init__(self, engine: Engine, tokenizer: BundleTokenizer):
        self.engine = engine
        self.tokenizer = tokenizer

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ContextLengthError when the prompt leaves no room for one generated token."""
        limit = self.engine.context_length
        if len(prompt_ids) >= limit:
            raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens but the context window is "
                                     f"{limit} tokens (including at least one generated token); "
                                     "shorten the prompt")
        if not prompt_ids:
            raise ValueError("the prompt is empty and the tokenizer adds no BOS token; give a prompt")

    def stream(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
               stop: list[str] | None = None, cancelled: Callable[[], bool] | None = None,
               deadline: float | None = None, ignore_eos: bool = False) -> Iterator[GenerationEvent]:
        """Generate up to `max_tokens` tokens after `prompt_ids`.

        Args:
            stop: strings that end generation; the text is cut before the first match.
            cancelled: polled before each token; True ends generation ("cancelled").
            deadline: `time.monotonic()` value after which generation ends ("time_limit").
            ignore_eos: keep generating after EOS (benchmarks that need a fixed token count).

        Yields a GenerationEvent per token (its text may be empty while a multi-byte character
        or a possible stop string is incomplete), then one whose `result` is set.

        Raises:
            ContextLengthError: the prompt does not fit the context window.
            ValueError: invalid sampling parameters or max_tokens.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.check_prompt(prompt_ids)
        sampler = Sampler(params, prompt_ids)
        store = self.engine.store
        before = store.stats.as_dict()
        store.stats.peak_resident_bytes = store.resident_bytes
        detok = IncrementalDetokenizer(self.tokenizer.tokenizer)
        matcher = StopStringMatcher(stop or [])
        cache = self.engine.new_cache()
        limit = min(max_tokens, self.engine.context_length - len(prompt_ids))

        started = time.perf_counter()
        logits = self.engine.forward(np.asarray(prompt_ids), cache)
        prefill_seconds = time.perf_counter() - started

        generated: list[int] = []
        text_parts: list[str] = []
        finish_reason = "length"
        decode_started = time.perf_counter()
        while len(generated) < limit:
            if cancelled is not None and cancelled():
                finish_reason = "cancelled"
                break
            if deadline is not None and time.monotonic() > deadline:
                finish_reason = "time_limit"
                break
            token = sampler(logits[-1])
            if token in self.tokenizer.eos_token_ids and not ignore_eos:
                finish_reason = "stop"
                break
            generated.append(token)
            sampler.accept(token)
            delta = matcher.feed(detok.add(token))
            text_parts.append(delta)
            yield GenerationEvent(token_id=token, text=delta)
            if matcher.stopped:
                finish_reason = "stop"
                break
            if len(generated) < limit:
                logits = self.engine.forward(np.asarray([token]), cache)
        if not matcher.stopped:
            tail = matcher.feed(detok.flush())
            if matcher.stopped:
                finish_reason = "stop"
            else:
                tail += matcher.flush()
            if tail:
                text_parts.append(tail)
                yield GenerationEvent(text=tail)
        decode_seconds = time.perf_counter() - decode_started

        yield GenerationEvent(result=GenerationResult(
            text="".join(text_parts), token_ids=generated, finish_reason=finish_reason,
            stats=self._stats(before, len(prompt_ids), len(generated), prefill_seconds, decode_seconds)))

    def _stats(self, before: dict, prompt_tokens: int, generated: int, prefill_seconds: float,
               decode_seconds: float) -> GenerationStats:
        store = self.engine.store
        after = store.stats.as_dict()
        steps = max(generated - 1, 0)
        return GenerationStats(
            prompt_tokens=prompt_tokens, generated_tokens=generated,
            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
            prefill_tokens_per_second=prompt_tokens / prefill_seconds if prefill_seconds else 0.0,
            decode_tokens_per_second=steps / decode_seconds if steps and decode_seconds else 0.0,
            expert_loads=after["loads"] - before["loads"], cache_hits=after["hits"] - before["hits"],
            cache_misses=after["misses"] - before["misses"],
            bytes_read=after["bytes_read"] - before["bytes_read"],
            load_seconds=after["load_seconds"] - before["load_seconds"],
            stall_seconds=after["stall_seconds"] - before["stall_seconds"],
            inflight_hits=after["inflight_hits"] - before["inflight_hits"],
            preloads=after["preloads"] - before["preloads"],
            preloads_used=after["preloads_used"] - before["preloads_used"],
            peak_resident_expert_bytes=after["peak_resident_bytes"],
            expert_budget_bytes=store.budget_bytes, peak_rss_bytes=peak_rss_bytes())

    def generate(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                 **options) -> GenerationResult:
        """Run `stream` to the end and return its result; `options` are those of `stream`."""
        for event in self.stream(prompt_ids, max_tokens, params, **options):
            if event.result is not None:
                return event.result
        raise AssertionError("stream ended without a result")
