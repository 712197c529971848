"""`--expert-bits auto`: choose 8 or 4 bits per expert on a calibration text.

The procedure:

1. The importance of an expert is the perplexity increase on the calibration text when only that
   expert is at 4 bits and every other expert at 8 bits.
2. The uniform int8 and int4 bundles bracket the quality budget: the mix may reach a perplexity
   of at most int8's x (1 + budget).
3. The K least important experts go to 4 bits, with K the largest value within the budget,
   found by binary search (assuming perplexity grows with K).

The cost is one evaluation per expert, two uniform ones and about log2(E) for the search. All
evaluations reuse one engine: the exporter writes every expert at both widths, and each
evaluation points the manifest's expert entries at the chosen files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from edgemoe.export.quantize import HIGH_BITS, LOW_BITS
from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.evaluate import evaluate
from edgemoe.runtime.manifest import ExpertEntry
from edgemoe.runtime.tokenizer import BundleTokenizer

logger = logging.getLogger(__name__)

CALIBRATION_WINDOW = 256


@dataclass
class AutoChoice:
    """Widths chosen per expert and the measurements behind them."""

    entries: list[ExpertEntry]  # the chosen entry of every expert, with its importance
    record: dict  # stored in the manifest as `quantization`


def choose_expert_bits(bundle: Path, candidates: dict[int, list[ExpertEntry]], text: str,
                       quality_budget: float, calibration: str,
                       progress: Callable[[str], None] | None = None) -> AutoChoice:
    """Pick 8 or 4 bits per expert; `candidates` maps each width to every expert's entry at it.

    Raises:
        ValueError: the calibration text has fewer than 2 tokens.
    """
    high = {(e.layer, e.index): e for e in candidates[HIGH_BITS]}
    low = {(e.layer, e.index): e for e in candidates[LOW_BITS]}
    keys = sorted(high)
    budget_bytes = sum(max(high[k].resident_bytes, low[k].resident_bytes) for k in keys)
    engine = Engine(bundle, EngineOptions(budget_bytes=budget_bytes, verify=False, predictor=None,
                                          preload=False, measure_recall=False, use_profile=False))
    tokenizer = BundleTokenizer(bundle, engine.manifest)

    def perplexity(lowered: set) -> float:
        entries = [low[k] if k in lowered else high[k] for k in keys]
        engine.store.clear()
        engine.manifest.experts = entries
        engine.manifest.__post_init__()  # rebuilds the (layer, index) lookup
        return evaluate(engine, tokenizer, text, window=CALIBRATION_WINDOW).perplexity

    def report(message: str) -> None:
        logger.info(message)
        if progress:
            progress(message)

    uniform_high = perplexity(set())
    uniform_low = perplexity(set(keys))
    limit = uniform_high * (1 + quality_budget)
    report(f"calibration perplexity: int8 {uniform_high:.4f}, int4 {uniform_low:.4f}, limit {limit:.4f}")

    importance = {}
    for key in keys:
        importance[key] = perplexity({key}) - uniform_high
    order = sorted(keys, key=lambda k: (importance[k], k))

    # Largest K whose K least important experts at 4 bits keep the perplexity within the limit.
    measured = {0: uniform_high, len(keys): uniform_low}
    if uniform_low <= limit:
        best = len(keys)
    else:
        best, lo, hi = 0, 1, len(keys) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            measured[mid] = perplexity(set(order[:mid]))
            if measured[mid] <= limit:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
    lowered = set(order[:best])
    report(f"{best} of {len(keys)} experts at 4 bits, calibration perplexity {measured[best]:.4f}")

    entries = [replace(low[k] if k in lowered else high[k], importance=importance[k]) for k in keys]
    record = {
        "method": "auto", "candidate_bits": [HIGH_BITS, LOW_BITS], "quality_budget": quality_budget,
        "calibration": calibration, "calibration_window": CALIBRATION_WINDOW,
        "perplexity": {"int8": uniform_high, "int4": uniform_low, "mix": measured[best]},
        "perplexity_limit": limit, "experts_at_low_bits": best,
        "searched": {str(k): v for k, v in sorted(measured.items())},
    }
    return AutoChoice(entries=entries, record=record)
