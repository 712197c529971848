"""Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, seeded.

Order, as in transformers and llama.cpp: penalties on the raw logits, then temperature, then the
top-k, top-p and min-p filters on the resulting distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    """How to pick each token. `temperature` 0 is greedy; each filter has a value that disables it."""

    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    min_p: float = 0.0  # drop tokens below min_p * p(best); 0 disables
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # transformers: divides positive (multiplies negative) logits
    #                                  of tokens in the prompt or generated; 1 disables
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field, its allowed range and the value received."""
        checks = [
            ("temperature", 0.0 <= self.temperature <= 100.0, "[0, 100]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 disables it)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "(0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "[0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "[-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "[-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "(0, 10]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "[0, 2^63)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be in {allowed}, got {getattr(self, name)}")


class Sampler:
    """Samples token ids; the same seed, prompt and logits give the same tokens."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int] | None = None):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.seen = set(prompt_ids or [])  # tokens of prompt + output, for repetition_penalty
        self.counts: dict[int, int] = {}  # generated token -> occurrences

    def accept(self, token: int) -> None:
        """Record a generated token for the penalties."""
        self.seen.add(token)
        self.counts[token] = self.counts.get(token, 0) + 1

    def apply_penalties(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        if p.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter(self.seen, dtype=np.int64)
            values = logits[ids]
            with np.errstate(over="ignore"):  # a tiny penalty can overflow a positive logit to inf
                logits[ids] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            # inf - inf in the softmax would give NaN probabilities; the largest float ranks the same.
            np.minimum(logits, np.finfo(logits.dtype).max, out=logits)
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            ids = np.fromiter(self.counts, dtype=np.int64)
            counts = np.fromiter(self.counts.values(), dtype=np.float64)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        return logits

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token from logits [V]."""
        p = self.params
        scores = self.apply_penalties(logits.astype(np.float64))
        if p.temperature == 0.0:
            return int(np.argmax(scores))
        # Shifting the maximum to 0 first keeps a tiny temperature from overflowing the scores
        # to inf, which would make the probabilities below NaN. Scores far below the maximum
        # may become -inf, which exp() turns into probability 0.
        scores -= scores.max()
        with np.errstate(over="ignore"):
            scores /= p.temperature
        order = np.argsort(-scores, kind="stable")                                # [V], best first
        if p.top_k > 0:
            order = order[:p.top_k]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        if p.min_p > 0.0:
            keep = int(np.count_nonzero(probs >= p.min_p * probs[0]))
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
