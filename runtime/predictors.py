"""Predicting which experts layer l+1 will choose, before its router runs.

Each predictor scores every expert of layer l+1 for each token, from what is known while layer
l computes: the experts layer l chose, and the look-ahead router logits (layer l+1's norm and
router applied to layer l's residual, computed in layer l's dense graph). The K best scores per
token are the prediction. A wrong prediction only costs an on-demand load, so outputs never
depend on the predictor.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import numpy as np

from edgemoe.runtime.routing_profile import RoutingStats


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Predictor:
    """Interface: score experts of `layer` (the next one) for each token."""

    name = "base"
    needs_lookahead = False

    def __init__(self, stats: RoutingStats):
        self.stats = stats

    def scores(self, layer: int, previous: np.ndarray, lookahead: np.ndarray | None) -> np.ndarray:
        """Return [T, E] scores for `layer`, given previous [T, K] (experts at layer - 1) and
        lookahead [T, E] logits or None."""
        raise NotImplementedError


class FrequencyPredictor(Predictor):
    """Baseline: the experts chosen most often in that layer."""

    name = "frequency"

    def scores(self, layer, previous, lookahead):
        return np.broadcast_to(self.stats.shares()[layer], (previous.shape[0], self.stats.counts.shape[1]))


class TablePredictor(Predictor):
    """EdgeMoE's table: sum over the experts p chosen at layer - 1 of P(e at layer | p)."""

    name = "table"

    def scores(self, layer, previous, lookahead):
        table = self.stats.conditional(layer)                                     # [E, E]
        return table[previous].sum(axis=1) / previous.shape[1]                    # [T, E]


class LookaheadPredictor(Predictor):
    """Layer l+1's router applied to layer l's residual."""

    name = "lookahead"
    needs_lookahead = True

    def scores(self, layer, previous, lookahead):
        return _softmax(lookahead.astype(np.float64))                            # [T, E]


class CombinedPredictor(Predictor):
    """Mix of the look-ahead router's probabilities and the table's, weighted per layer by how
    well each has predicted that layer so far (their recall, when meters are attached).

    The look-ahead router is the better predictor in most layers but can be the worse one where
    the residual changes most (often layer 0 -> 1), so a fixed weight loses there.
    """

    name = "combined"
    needs_lookahead = True
    default_lookahead_weight = 0.7

    def __init__(self, stats: RoutingStats):
        super().__init__(stats)
        self.meters: dict[str, "RecallMeter"] = {}

    def lookahead_weight(self, layer: int) -> float:
        ahead, table = self.meters.get("lookahead"), self.meters.get("table")
        if ahead is None or table is None or ahead.total[layer] < 64:
            return self.default_lookahead_weight
        hits_ahead, hits_table = ahead.hits[layer], table.hits[layer]
        # Squaring sharpens the preference for the better predictor.
        return float(hits_ahead ** 2 / max(hits_ahead ** 2 + hits_table ** 2, 1))

    def scores(self, layer, previous, lookahead):
        table = TablePredictor.scores(self, layer, previous, lookahead)
        ahead = _softmax(lookahead.astype(np.float64))
        weight = self.lookahead_weight(layer)
        return weight * ahead + (1 - weight) * table


PREDICTORS = {cls.name: cls for cls in (FrequencyPredictor, TablePredictor, LookaheadPredictor, CombinedPredictor)}


def make_predictor(name: str, stats: RoutingStats) -> Predictor:
    """Build a predictor by name.

    Raises:
        ValueError: unknown name; the message lists the choices.
    """
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")
    return PREDICTORS[name](stats)


def top_experts(scores: np.ndarray, count: int) -> np.ndarray:
    """[T, count] indices of the best scores per token, best first (lower index on ties)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :count]


class RecallMeter:
    """Fraction of actually chosen experts that a predictor had predicted, per layer."""

    def __init__(self, num_layers: int):
        self.hits = np.zeros(num_layers, np.int64)
        self.total = np.zeros(num_layers, np.int64)

    def record(self, layer: int, predicted: np.ndarray, actual: np.ndarray) -> None:
        """predicted [T, P] and actual [T, K] expert indices of the same tokens."""
        hits = (predicted[:, :, None] == actual[:, None, :]).any(axis=1).sum()
        self.hits[layer] += int(hits)
        self.total[layer] += actual.size

    def summary(self) -> dict:
        per_layer = [float(h / t) if t else None for h, t in zip(self.hits, self.total)]
        total = int(self.total.sum())
        return {"overall": float(self.hits.sum() / total) if total else None, "per_layer": per_layer}
