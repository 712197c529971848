"""Eviction policies for the expert store.

A policy only orders candidates. The store decides when to evict, and never offers a pinned
expert (one running now) or an in-flight one. It offers experts the current layer still needs
only when nothing else is left.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np

ExpertKey = tuple[int, int]  # (layer, expert index)


class EvictionPolicy:
    """Interface: the store reports layer changes, accesses, inserts and removals."""

    name = "base"

    def on_layer(self, layer: int) -> None:
        """Called when `layer` starts running."""

    def on_access(self, key: ExpertKey) -> None:
        raise NotImplementedError

    def on_insert(self, key: ExpertKey) -> None:
        raise NotImplementedError

    def on_remove(self, key: ExpertKey) -> None:
        raise NotImplementedError

    def choose_victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used expert."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def on_access(self, key: ExpertKey) -> None:
        self._order.move_to_end(key)

    def on_insert(self, key: ExpertKey) -> None:
        self._order[key] = None

    def on_remove(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def choose_victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        return None


class LFUPolicy(LRUPolicy):
    """Evict the least frequently used expert (uses counted since start); LRU breaks ties."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[ExpertKey, int] = {}

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self.uses[key] = self.uses.get(key, 0) + 1

    def on_insert(self, key: ExpertKey) -> None:
        super().on_insert(key)
        self.uses[key] = self.uses.get(key, 0) + 1

    def choose_victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        allowed = set(candidates)
        recency = {key: rank for rank, key in enumerate(self._order) if key in allowed}
        if not recency:
            return None
        return min(recency, key=lambda k: (self.uses.get(k, 0), recency[k]))


class EdgeMoEPolicy(LRUPolicy):
    """Evict the expert least likely to be needed soon, as EdgeMoE (Yi et al., arXiv 2308.14352)
    describes: low activation frequency, and a layer that comes again late.

    keep(e) = f(e) / (1 + d(e)), and the expert with the lowest keep score is evicted.

    - f(e) is the expert's share of its layer's activations: from the bundle's routing profile
      when present, else from the uses counted since start (plus one, so new experts score > 0).
    - d(e) = (layer(e) - current layer) mod L is the number of layers until the expert's layer
      runs again. It is 0 for the current layer; the paper's printed score divides by this
      distance, so the 1 + keeps the current layer finite (and highest).

    LRU order breaks ties.
    """

    name = "edgemoe"

    def __init__(self, num_layers: int, frequencies: np.ndarray | None = None) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.frequencies = frequencies  # [L, E] activation shares, or None
        self.uses: dict[ExpertKey, int] = {}
        self.current_layer = 0

    def on_layer(self, layer: int) -> None:
        self.current_layer = layer

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self.uses[key] = self.uses.get(key, 0) + 1

    def on_insert(self, key: ExpertKey) -> None:
        super().on_insert(key)
        self.uses.setdefault(key, 0)

    def keep_score(self, key: ExpertKey) -> float:
        layer, index = key
        if self.frequencies is not None:
            frequency = float(self.frequencies[layer, index])
        else:
            frequency = float(self.uses.get(key, 0) + 1)
        distance = (layer - self.current_layer) % self.num_layers
        return frequency / (1 + distance)

    def choose_victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        allowed = set(candidates)
        recency = {key: rank for rank, key in enumerate(self._order) if key in allowed}
        if not recency:
            return None
        return min(recency, key=lambda k: (self.keep_score(k), recency[k]))


POLICIES = ("lru", "lfu", "edgemoe")


def make_policy(name: str, num_layers: int, frequencies: np.ndarray | None = None) -> EvictionPolicy:
    """Build a policy by name.

    Raises:
        ValueError: unknown name; the message lists the choices.
    """
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "edgemoe":
        return EdgeMoEPolicy(num_layers, frequencies)
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}")
