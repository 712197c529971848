"""Per-layer cache kept between decode steps.

Each layer holds the cache tensors that its bundle declares (ModelConfig.cache_tensors): key and
value [K, S, D] (K key/value heads, S cached tokens, D head dim) for grouped-query attention, or
the compressed latent c_kv [S, R] and the rotated shared key k_pe [S, Dr] for multi-head latent
attention.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, tensors: list[tuple[str, list[int | str]]]):
        """Create an empty cache of `num_layers` layers, each holding `tensors` as (name, shape)
        with "S" marking the token axis."""
        self._token_axis = {name: shape.index("S") for name, shape in tensors}
        self.layers = [{name: np.zeros([0 if d == "S" else d for d in shape], np.float32)
                        for name, shape in tensors} for _ in range(num_layers)]

    @property
    def length(self) -> int:
        name, axis = next(iter(self._token_axis.items()))
        return self.layers[0][name].shape[axis]

    @property
    def nbytes(self) -> int:
        """Bytes held by all cache tensors of all layers."""
        return sum(array.nbytes for layer in self.layers for array in layer.values())

    def inputs(self, layer: int) -> dict[str, np.ndarray]:
        """Return the layer graph's cache inputs: past_NAME for each cache tensor."""
        return {f"past_{name}": array for name, array in self.layers[layer].items()}

    def update(self, layer: int, outputs: dict[str, np.ndarray]) -> None:
        """Replace one layer's tensors with the graph's present_NAME outputs."""
        # NOTE: the layer graph returns past + new concatenated, so each step copies the whole
        # cache once per layer; fine for phone-sized contexts, a preallocated cache with IO
        # binding would avoid it for long ones.
        for name in self.layers[layer]:
            self.layers[layer][name] = outputs[f"present_{name}"]
