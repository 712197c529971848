"""The layer loop: resident dense graphs, experts from the expert store, KV cache.

Shape legend: T tokens in this call, H hidden size, E experts, K experts per token, V vocab.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.runtime.expert_store import ExpertStore
from edgemoe.runtime.kv_cache import KVCache
from edgemoe.runtime.manifest import Manifest, load_manifest, verify_file
from edgemoe.runtime.routing import route_softmax_topk
from edgemoe.runtime.sessions import default_threads, dense_session

logger = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """A request does not fit in the model's context window."""


@dataclass
class EngineOptions:
    budget_bytes: int | None = None  # None: every expert may stay resident
    threads: int = 0  # threads of each dense session; 0 picks min(4, cores)
    verify: bool = True  # check sha256 of each bundle file before its first use


class Engine:
    """Runs one model from a bundle, batch size 1.

    Args:
        bundle_dir: bundle directory.
        options: budget, threads, verification.

    Raises:
        BundleError: the bundle is missing files or a file does not match the manifest.
        BudgetTooSmallError: the budget cannot hold one layer's top-k experts.
    """

    def __init__(self, bundle_dir: str | Path, options: EngineOptions | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.options = options or EngineOptions()
        self.manifest: Manifest = load_manifest(self.bundle_dir)
        self.config = self.manifest.config
        threads = self.options.threads or default_threads()

        dense = [self.manifest.graphs["embed"], *self.manifest.graphs["layers"], self.manifest.graphs["head"]]
        if self.options.verify:
            for graph in dense:
                for name in self._graph_files(graph):
                    verify_file(self.bundle_dir, self.manifest, name)
        self.embed = dense_session(str(self.bundle_dir / dense[0]), threads)
        self.layers = [dense_session(str(self.bundle_dir / p), threads) for p in dense[1:-1]]
        self.head = dense_session(str(self.bundle_dir / dense[-1]), threads)

        budget = self.options.budget_bytes
        if budget is None:
            budget = self.manifest.expert_bytes
        self.store = ExpertStore(self.bundle_dir, self.manifest, budget, verify=self.options.verify)

    def _graph_files(self, graph: str) -> list[str]:
        """The graph and every data file that sits next to it in the manifest."""
        stem = graph.rsplit(".", 1)[0]
        names = [graph] + [n for n in self.manifest.files if n == stem + ".bin"]
        if graph == self.manifest.graphs["head"] and "embed.bin" in self.manifest.files:
            names.append("embed.bin")  # tied LM head reads the embedding table
        return names

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers, self.config.num_key_value_heads, self.config.head_dim)

    def forward(self, token_ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run the model on `token_ids` after the tokens already in `cache`.

        Args:
            token_ids: [T] int64 new tokens.
            cache: updated in place.
            all_logits: return logits for every new token instead of the last one.

        Returns:
            logits [T, V] or [1, V], float32.

        Raises:
            ContextLengthError: the cache plus the new tokens exceed the context window.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)                   # [T]
        start = cache.length
        if start + len(ids) > self.context_length:
            raise ContextLengthError(
                f"{start + len(ids)} tokens exceed the model's context window of {self.context_length}")
        positions = np.arange(start, start + len(ids), dtype=np.int64)            # [T]

        (hidden,) = self.embed.run(None, {"input_ids": ids})                       # [T, H]
        for layer, session in enumerate(self.layers):
            residual, moe_input, router_logits, key, value = session.run(None, {
                "hidden": hidden, "position_ids": positions,
                "past_key": cache.keys[layer], "past_value": cache.values[layer]})
            cache.update(layer, key, value)
            hidden = residual + self.moe(layer, moe_input, router_logits)         # [T, H]

        if not all_logits:
            hidden = hidden[-1:]                                                  # [1, H]
        (logits,) = self.head.run(None, {"hidden": hidden})                       # [T, V]
        return logits

    def moe(self, layer: int, x: np.ndarray, router_logits: np.ndarray) -> np.ndarray:
        """Weighted sum of the chosen experts' outputs for x [T, H].

        Each chosen expert runs once, on all the tokens routed to it.
        """
        weights, experts = route_softmax_topk(router_logits, self.config.num_experts_per_tok,
                                              self.config.norm_topk_prob)        # [T, K], [T, K]
        out = np.zeros_like(x)                                                    # [T, H]
        for expert in np.unique(experts):
            rows, slots = np.nonzero(experts == expert)                           # tokens routed here
            session = self.store.acquire(layer, int(expert))
            try:
                (y,) = session.run(None, {"x": x[rows]})                          # [t, H]
            finally:
                self.store.release(layer, int(expert))
            out[rows] += weights[rows, slots][:, None] * y
        return out
