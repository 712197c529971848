"""Top-k routing as the supported families do it in transformers 5.25.

Shapes: T tokens, E experts, K experts per token, G expert groups.

Every method takes (router_logits, top_k, normalize) and the keyword arguments that the manifest
stores for it (`routing_params`, and `e_score_correction_bias` per layer from `router_bias`).
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


def _keep_top_groups(choice: np.ndarray, n_group: int, topk_group: int, group_score: str,
                     fill: float) -> np.ndarray:
    """Return choice [T, E] with every expert outside the `topk_group` best groups set to `fill`.

    The E experts form n_group consecutive groups. A group scores the max of its experts'
    choice values ("max", DeepSeek-V2) or the sum of its two largest ("top2_sum", DeepSeek-V3).
    """
    tokens, experts = choice.shape
    grouped = choice.reshape(tokens, n_group, experts // n_group)                 # [T, G, E/G]
    if group_score == "max":
        group_scores = grouped.max(axis=-1)                                       # [T, G]
    else:
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)           # [T, G]
    best_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
    keep = np.zeros((tokens, n_group), dtype=bool)
    np.put_along_axis(keep, best_groups, True, axis=-1)
    return np.where(np.repeat(keep, experts // n_group, axis=-1), choice, np.float32(fill))  # [T, E]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def route_softmax_group_topk(router_logits: np.ndarray, top_k: int, normalize: bool, n_group: int = 1,
                             topk_group: int = 1, routed_scaling_factor: float = 1.0
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Choose `top_k` experts by softmax over all experts within the `topk_group` groups whose
    best expert scores highest (DeepSeek-V2 "group_limited_greedy"; n_group 1 is "greedy").

    The weights are the softmax probabilities times `routed_scaling_factor`. `normalize` is
    ignored: transformers 5.25 never renormalises DeepSeek-V2's weights, and its exporter
    rejects norm_topk_prob true.
    """
    probs = _softmax(router_logits.astype(np.float32))                           # [T, E]
    kept = _keep_top_groups(probs, n_group, topk_group, "max", 0.0)               # [T, E]
    indices = np.argsort(-kept, axis=-1, kind="stable")[:, :top_k]               # [T, K]
    weights = np.take_along_axis(probs, indices, axis=-1) * np.float32(routed_scaling_factor)
    return weights.astype(np.float32), indices.astype(np.int64)


def route_sigmoid_group_topk(router_logits: np.ndarray, top_k: int, normalize: bool, n_group: int = 1,
                             topk_group: int = 1, routed_scaling_factor: float = 1.0,
                             e_score_correction_bias: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Choose `top_k` experts by sigmoid score plus `e_score_correction_bias` within the
    `topk_group` groups with the largest sum of their two best biased scores (DeepSeek-V3).

    The bias only chooses: the weights are the unbiased sigmoid scores of the chosen experts,
    renormalised to sum to 1 when `normalize`, then times `routed_scaling_factor`.
    """
    scores = 1.0 / (1.0 + np.exp(-router_logits.astype(np.float32)))            # [T, E]
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias
    kept = _keep_top_groups(choice.astype(np.float32), n_group, topk_group, "top2_sum", -np.inf)
    indices = np.argsort(-kept, axis=-1, kind="stable")[:, :top_k]               # [T, K]
    weights = np.take_along_axis(scores, indices, axis=-1)                        # [T, K]
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    weights = weights * np.float32(routed_scaling_factor)
    return weights.astype(np.float32), indices.astype(np.int64)


def choice_logits_softmax_group(router_logits: np.ndarray, n_group: int = 1, topk_group: int = 1,
                                **_unused) -> np.ndarray:
    """Return logits [T, E] whose softmax ranks experts as route_softmax_group_topk chooses them."""
    logits = router_logits.astype(np.float32)
    return _keep_top_groups(logits, n_group, topk_group, "max", -np.inf)


def choice_logits_sigmoid_group(router_logits: np.ndarray, n_group: int = 1, topk_group: int = 1,
                                e_score_correction_bias: np.ndarray | None = None, **_unused) -> np.ndarray:
    """Return logits [T, E] whose softmax ranks experts as route_sigmoid_group_topk chooses them."""
    choice = 1.0 / (1.0 + np.exp(-router_logits.astype(np.float32)))
    if e_score_correction_bias is not None:
        choice = choice + e_score_correction_bias
    return _keep_top_groups(choice.astype(np.float32), n_group, topk_group, "top2_sum", -np.inf)


# Manifest `routing` value -> routing function. A method with extra keyword arguments gets them
# from the manifest's `routing_params` (and `router_bias`).
ROUTING_METHODS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "softmax_topk": route_softmax_topk,
    "topk_softmax": route_topk_softmax,
    "sparsemixer": route_sparsemixer,
    "softmax_group_topk": route_softmax_group_topk,
    "sigmoid_group_topk": route_sigmoid_group_topk,
}

# Routing methods whose choice is not the top-k of the router logits -> a function that turns
# router logits into logits that rank experts as the method chooses them. The predictors score
# the look-ahead router logits through it.
CHOICE_LOGITS: dict[str, Callable[..., np.ndarray]] = {
    "softmax_group_topk": choice_logits_softmax_group,
    "sigmoid_group_topk": choice_logits_sigmoid_group,
}
