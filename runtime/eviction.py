"""Eviction policies for the expert store.

A policy only orders candidates; the store decides when to evict and never offers a pinned
expert (one in use by the layer being computed).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

ExpertKey = tuple[int, int]  # (layer, expert index)


class EvictionPolicy:
    """Interface: the store reports accesses, inserts and removals, and asks for a victim."""

    name = "base"

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


POLICIES = {LRUPolicy.name: LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
