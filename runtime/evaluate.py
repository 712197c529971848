"""Perplexity of a bundle on a text file: the quality yardstick for exports and quantization.

The whole file is tokenized once without special tokens and cut into consecutive,
non-overlapping windows of `window` tokens; a last partial window counts when it has at least
2 tokens. Each window is scored from an empty KV cache: the mean negative log-likelihood of
tokens 1..n-1 given the tokens before them in the window.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from edgemoe.runtime.engine import Engine
from edgemoe.runtime.tokenizer import BundleTokenizer


@dataclass
class EvalResult:
    """Scores of one evaluation."""

    mean_nll: float  # nats per predicted token
    perplexity: float  # exp(mean_nll)
    predicted_tokens: int
    windows: int
    window: int
    tokens_per_second: float  # tokens processed (including each window's first) per second
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Sum of -log p(ids[i+1] | ids[..i]) from logits [n, V] (float64 accumulation)."""
    logits = logits[:-1].astype(np.float64)                                       # [n-1, V]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))                                  # [n-1]
    targets = np.asarray(ids[1:])
    return float((log_z - shifted[np.arange(len(targets)), targets]).sum())


def evaluate(engine: Engine, tokenizer: BundleTokenizer, text: str, window: int = 256,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Score `text`; `progress` is called with the token count of each finished window.

    Raises:
        ValueError: window outside [2, context window], or text with fewer than 2 tokens.
    """
    if not 2 <= window <= engine.context_length:
        raise ValueError(f"window must be in [2, {engine.context_length}] (the context window), got {window}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    windows = split_windows(ids, window)
    if not windows:
        raise ValueError(f"the text has {len(ids)} tokens; at least 2 are needed to score it")
    started = time.perf_counter()
    total_nll, predicted, processed = 0.0, 0, 0
    for chunk in windows:
        logits = engine.forward(np.asarray(chunk), engine.new_cache(), all_logits=True)
        total_nll += window_nll(logits, chunk)
        predicted += len(chunk) - 1
        processed += len(chunk)
        if progress:
            progress(len(chunk))
    seconds = time.perf_counter() - started
    mean = total_nll / predicted
    return EvalResult(mean_nll=mean, perplexity=float(np.exp(mean)), predicted_tokens=predicted,
                      windows=len(windows), window=window, tokens_per_second=processed / seconds,
                      seconds=seconds)
