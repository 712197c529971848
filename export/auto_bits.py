"""`--expert-bits auto`: choose a width per expert on a calibration text.

EdgeMoE's procedure over the candidate widths 16 (fp16), 8, 4 and 2 bits:

1. Every uniform bundle is measured. The reference is uniform fp16, and the limit is its
   perplexity x (1 + budget). The two adjacent widths whose uniform perplexities bracket the
   limit are chosen between: `high`, the narrowest width within the limit, and `low`, the next
   narrower one. When even the narrowest width is within the limit, every expert gets it.
2. The importance of an expert is the perplexity increase when only that expert is at `low` and
   every other expert at `high`.
3. The K least important experts go to `low`, with K the largest value within the limit, found
   by binary search (assuming perplexity grows with K).

The cost is one evaluation per expert, four uniform ones and about log2(E) for the search: it
grows linearly with the number of experts E, times the calibration length. All evaluations reuse
one engine: the exporter writes every expert at every width, and each evaluation points the
manifest's expert entries at the chosen files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from edgemoe.export.quantize import AUTO_CANDIDATE_BITS
from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.evaluate import evaluate
from edgemoe.runtime.kernels import adapt_experts
from edgemoe.runtime.manifest import ExpertEntry
from edgemoe.runtime.tokenizer import BundleTokenizer

logger = logging.getLogger(__name__)

CALIBRATION_WINDOW = 256  # tokens per evaluation window, or the model's context when shorter
CANDIDATE_BITS = AUTO_CANDIDATE_BITS


def width_name(bits: int) -> str:
    return "fp16" if bits == 16 else f"int{bits}"


@dataclass
class AutoChoice:
    """Widths chosen per expert and the measurements behind them."""

    entries: list[ExpertEntry]  # the chosen entry of every expert, with its importance
    record: dict  # stored in the manifest as `quantization`


def choose_expert_bits(bundle: Path, candidates: dict[int, list[ExpertEntry]], text: str,
                       quality_budget: float, calibration: str, progress: bool = False) -> AutoChoice:
    """Pick a width per expert; `candidates` maps each width in CANDIDATE_BITS to every expert's
    entry at it.

    Raises:
        ValueError: the calibration text has fewer than 2 tokens.
    """
    by_width = {bits: {(e.layer, e.index): e for e in candidates[bits]} for bits in CANDIDATE_BITS}
    keys = sorted(by_width[CANDIDATE_BITS[0]])
    runnable = {bits: dict(zip(keys, adapt_experts(bundle, [by_width[bits][k] for k in keys])))
                for bits in CANDIDATE_BITS}
    budget_bytes = sum(max(runnable[bits][k].resident_bytes for bits in CANDIDATE_BITS) for k in keys)
    engine = Engine(bundle, EngineOptions(budget_bytes=budget_bytes, verify=False, predictor=None,
                                          preload=False, measure_recall=False, use_profile=False))
    tokenizer = BundleTokenizer(bundle, engine.manifest)
    window = min(CALIBRATION_WINDOW, engine.context_length)

    def perplexity(high: int, low: int, lowered: set) -> float:
        engine.store.clear()
        engine.manifest.experts = [runnable[low if k in lowered else high][k] for k in keys]
        engine.manifest.__post_init__()  # rebuilds the (layer, index) lookup
        return evaluate(engine, tokenizer, text, window=window).perplexity

    uniform = {bits: perplexity(bits, bits, set()) for bits in CANDIDATE_BITS}
    reference = uniform[CANDIDATE_BITS[0]]
    limit = reference * (1 + quality_budget)
    logger.info("calibration perplexity: %s, limit %.4f",
                ", ".join(f"{width_name(b)} {p:.4f}" for b, p in uniform.items()), limit)
    within = [bits for bits in CANDIDATE_BITS if uniform[bits] <= limit]
    high = min(within)  # the reference is always within
    lower = [bits for bits in CANDIDATE_BITS if bits < high]
    importance: dict = {k: None for k in keys}
    measured = {0: uniform[high]}
    if not lower:
        low, best = high, 0
    else:
        low = max(lower)
        base = uniform[high]
        for key in tqdm(keys, desc=f"importance at {width_name(low)}", unit="expert", disable=not progress):
            importance[key] = perplexity(high, low, {key}) - base
        order = sorted(keys, key=lambda k: (importance[k], k))
        # Largest K whose K least important experts at `low` keep the perplexity within the limit.
        measured[len(keys)] = uniform[low]
        best, lo, hi = 0, 1, len(keys) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            measured[mid] = perplexity(high, low, set(order[:mid]))
            if measured[mid] <= limit:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
    lowered = set(order[:best]) if best else set()
    logger.info("%d of %d experts at %s and the others at %s, calibration perplexity %.4f",
                best, len(keys), width_name(low), width_name(high), measured[best])

    entries = [replace(by_width[low if k in lowered else high][k], importance=importance[k]) for k in keys]
    record = {
        "method": "auto", "candidate_bits": list(CANDIDATE_BITS), "quality_budget": quality_budget,
        "calibration": calibration, "calibration_window": window,
        "perplexity": {**{width_name(b): p for b, p in uniform.items()}, "mix": measured[best]},
        "perplexity_limit": limit, "high_bits": high, "low_bits": low, "experts_at_low_bits": best,
        "searched": {str(k): v for k, v in sorted(measured.items())},
    }
    return AutoChoice(entries=entries, record=record)
