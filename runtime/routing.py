"""Softmax top-k routing, as Mixtral, Qwen3-MoE and OLMoE do it in transformers.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import numpy as np


def route_softmax_topk(router_logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Choose `top_k` experts per token.

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
