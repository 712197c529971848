"""Per-layer key/value cache kept between decode steps.

Each layer holds key and value arrays [K, S, D] (K key/value heads, S cached tokens, D head dim).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int):
        empty = np.zeros((num_kv_heads, 0, head_dim), np.float32)
        self.keys = [empty] * num_layers
        self.values = [empty] * num_layers

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    def update(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        # NOTE: the layer graph returns past + new concatenated, so each step copies the whole
        # cache once per layer; fine for phone-sized contexts, a preallocated cache with IO
        # binding would avoid it for long ones.
        self.keys[layer] = key
        self.values[layer] = value
