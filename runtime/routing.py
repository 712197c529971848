"""Top-k routing as the supported families do it in transformers 5.25.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def route_softmax_topk(router_logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Choose `top_k` experts per token by softmax over all experts, then top-k (Mixtral,
    Qwen2-MoE, Qwen3-MoE, OLMoE).

    Args:
        router_logits: [T, E] float32.
        top_k: experts per token.
        normalize: renormalise the chosen probabilities to sum to 1 (`norm_topk_prob`).

    Returns:
        weights [T, K] float32 and expert indices [T, K] int64, best first.
    """
    logits = router_logits.astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)                        # [T, E]
    # Stable sort on the negated values keeps the lower index first on ties, as torch.topk does.
    indices = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]               # [T, K]
    weights = np.take_along_axis(probs, indices, axis=-1)                         # [T, K]
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.astype(np.float32), indices.astype(np.int64)


def route_topk_softmax(router_logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Choose `top_k` experts per token by top-k on the logits, then softmax over those k only
    (Granite-MoE).

    Same arguments and returns as `route_softmax_topk`. `normalize` is ignored, because the
    weights sum to 1 already.
    """
    logits = router_logits.astype(np.float32)
    indices = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]              # [T, K]
    chosen = np.take_along_axis(logits, indices, axis=-1)                         # [T, K]
    shifted = np.exp(chosen - chosen[:, :1])                                      # column 0 is the max
    weights = shifted / shifted.sum(axis=-1, keepdims=True)                       # [T, K]
    return weights.astype(np.float32), indices.astype(np.int64)


# Manifest `routing` value -> routing function.
ROUTING_METHODS: dict[str, Callable[[np.ndarray, int, bool], tuple[np.ndarray, np.ndarray]]] = {
    "softmax_topk": route_softmax_topk,
    "topk_softmax": route_topk_softmax,
}
