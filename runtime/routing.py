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


def route_sparsemixer(router_logits: np.ndarray, top_k: int, normalize: bool,
                      jitter_eps: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Choose experts one at a time as PhiMoE's sparsemixer does at inference (Phi-3.5-MoE).

    Step i picks the largest logit m among the experts not chosen yet (the lower index on ties).
    An expert e stays in that step's softmax when (m - logit_e) / max(|logit_e|, m) <= 2 *
    jitter_eps, and the chosen expert's weight is its share of that softmax. Because of that mask
    the weights need not sum to 1. transformers 5.25 always makes two steps, whatever
    num_experts_per_tok is set to, so the exporter writes this method only for top_k 2.

    Args:
        router_logits: [T, E] float32.
        top_k: experts per token.
        normalize: ignored, because sparsemixer never renormalises.
        jitter_eps: the config's `router_jitter_noise`, from the manifest's `routing_params`.

    Returns:
        weights [T, K] float32 and expert indices [T, K] int64, in the order chosen.
    """
    logits = router_logits.astype(np.float32)                                     # [T, E]
    rows = np.arange(logits.shape[0])
    remaining = logits.copy()                                                     # chosen experts -> -inf
    threshold = np.float32(2 * jitter_eps)
    weights, indices = [], []
    for _ in range(top_k):
        chosen = np.argmax(remaining, axis=-1)                                    # [T], first index on ties
        best = remaining[rows, chosen][:, None]                                   # [T, 1]
        # The gap is measured against the unmasked logits, as transformers does in both steps.
        with np.errstate(divide="ignore", invalid="ignore"):
            # 0 / 0 gives NaN, which compares False and keeps the expert, as in torch.
            gap = (best - logits) / np.maximum(np.abs(logits), best)             # [T, E]
        gates = np.where(gap > threshold, -np.inf, remaining)                     # [T, E]
        shifted = np.exp(gates - best)                                            # best is the row max
        weights.append(shifted[rows, chosen] / shifted.sum(axis=-1))              # [T]
        indices.append(chosen)
        remaining[rows, chosen] = -np.inf
    return np.stack(weights, axis=-1).astype(np.float32), np.stack(indices, axis=-1).astype(np.int64)


# Manifest `routing` value -> routing function. A method with extra keyword arguments gets them
# from the manifest's `routing_params`.
ROUTING_METHODS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "softmax_topk": route_softmax_topk,
    "topk_softmax": route_topk_softmax,
    "sparsemixer": route_sparsemixer,
}
