"""The layer loop: resident dense graphs, experts from the expert store, KV cache.

Shape legend: T tokens in this call, H hidden size, E experts, K experts per token, V vocab.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from edgemoe.runtime.eviction import make_policy
from edgemoe.runtime.expert_store import ExpertStore
from edgemoe.runtime.kv_cache import KVCache
from edgemoe.runtime.kernels import runtime_manifest
from edgemoe.runtime.manifest import BundleError, Manifest, verify_file
from edgemoe.runtime.predictors import (PREDICTORS, CombinedPredictor, RecallMeter, TablePredictor, make_predictor,
                                        top_experts)
from edgemoe.runtime.preloader import Preloader
from edgemoe.runtime.routing import CHOICE_LOGITS, ROUTING_METHODS
from edgemoe.runtime.routing_profile import RoutingStats
from edgemoe.runtime.sessions import default_threads, dense_session

logger = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """A request does not fit in the model's context window."""


@dataclass
class EngineOptions:
    budget_bytes: int | None = None  # None: every expert may stay resident
    threads: int = 0  # threads of each dense session; 0 picks min(4, cores)
    verify: bool = True  # check sha256 of each bundle file before its first use
    eviction: str = "lru"  # "lru", "lfu" or "edgemoe"
    predictor: str | None = "auto"  # a name of PREDICTORS, "auto" (combined, or table without
    #                                 look-ahead outputs in the bundle) or None (no prediction)
    preload: bool = True  # load predicted experts on the I/O thread
    preload_depth: int = 1  # layers ahead to preload; beyond the next, the table chains predictions
    keep_only_current_layer: bool = False  # the on-demand baseline: no reuse across layers
    measure_recall: bool = True  # score every predictor against the actual routing
    preload_min_recall: float = 0.5  # skip preloading a layer whose predictions have been worse
    use_profile: bool = True  # start from the bundle's routing profile (else from empty statistics)
    widen_2bit: bool | None = None  # 2-bit experts: None widens them only without a 2-bit kernel


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
        self.manifest: Manifest = runtime_manifest(self.bundle_dir, self.options.widen_2bit)
        self.config = self.manifest.config
        threads = self.options.threads or default_threads()

        dense = [self.manifest.graphs["embed"], *self.manifest.graphs["layers"], self.manifest.graphs["head"]]
        if self.options.verify:
            for graph in dense:
                for name in self._graph_files(graph):
                    verify_file(self.bundle_dir, self.manifest, name)
        self.embed = dense_session(str(self.bundle_dir / dense[0]), threads)
        self.layers = [dense_session(str(self.bundle_dir / p), threads) for p in dense[1:-1]]
        self.layer_outputs = [self._check_layer_outputs(layer, session)
                              for layer, session in enumerate(self.layers)]
        self.head = dense_session(str(self.bundle_dir / dense[-1]), threads)
        self.route = ROUTING_METHODS[self.config.routing]
        self.choice_logits = CHOICE_LOGITS.get(self.config.routing)
        self.moe_layers = [layer for layer in range(self.config.num_hidden_layers) if self.config.is_moe_layer(layer)]

        budget = self.manifest.expert_bytes if self.options.budget_bytes is None else self.options.budget_bytes
        cfg = self.config
        profile = RoutingStats.load(self.bundle_dir, self.manifest) if self.options.use_profile else None
        self.routing = profile or RoutingStats(cfg.num_hidden_layers, cfg.num_experts)
        frequencies = profile.shares() if profile is not None else None
        policy = make_policy(self.options.eviction, cfg.num_hidden_layers, frequencies)
        self.store = ExpertStore(self.bundle_dir, self.manifest, budget, policy=policy, verify=self.options.verify,
                                 keep_only_current_layer=self.options.keep_only_current_layer)

        self.has_lookahead = any("next_router_logits" in names for names in self.layer_outputs)
        self.predictor = self._make_active_predictor(self.options.predictor)
        measured = [n for n, cls in PREDICTORS.items() if self.has_lookahead or not cls.needs_lookahead]
        self.meters = {name: RecallMeter(cfg.num_hidden_layers) for name in measured} \
            if self.options.measure_recall else {}
        self._meter_predictors = {name: make_predictor(name, self.routing) for name in self.meters}
        for predictor in (self.predictor, self._meter_predictors.get("combined")):
            if isinstance(predictor, CombinedPredictor):
                predictor.meters = self.meters
        self.preloader = Preloader(self.store) if self.options.preload and self.predictor is not None else None

    def _make_active_predictor(self, name: str | None):
        if name is None:
            return None
        if name == "auto":
            name = "combined" if self.has_lookahead else "table"
        if PREDICTORS.get(name) is None:
            raise ValueError(f"unknown predictor {name!r}; choose one of auto, {', '.join(PREDICTORS)}")
        if PREDICTORS[name].needs_lookahead and not self.has_lookahead:
            raise ValueError(f"predictor {name!r} needs look-ahead router outputs, which this bundle lacks; "
                             "re-export it with this edgemoe or choose table or frequency")
        return make_predictor(name, self.routing)

    def close(self) -> None:
        """Stop the preload thread; the engine must not be used afterwards."""
        if self.preloader is not None:
            self.preloader.close()

    def load_all_experts(self) -> None:
        """Load every expert now (the all-in-RAM baseline); the budget must hold them all."""
        for layer in self.moe_layers:
            for index in range(self.config.num_experts):
                self.store.preload((layer, index))

    def recall(self) -> dict:
        """Recall of each predictor so far: {"overall", "per_layer"} by predictor name."""
        return {name: meter.summary() for name, meter in self.meters.items()}

    def _graph_files(self, graph: str) -> list[str]:
        """The graph and every data file that sits next to it in the manifest."""
        stem = graph.rsplit(".", 1)[0]
        names = [graph] + [n for n in self.manifest.files if n == stem + ".bin"]
        if graph == self.manifest.graphs["head"] and "embed.bin" in self.manifest.files:
            names.append("embed.bin")  # tied LM head reads the embedding table
        return names

    def _check_layer_outputs(self, layer: int, session) -> list[str]:
        """Return the layer graph's output names after checking them against the manifest.

        Every layer graph has residual and present_NAME for each cache tensor (present_key and
        present_value unless the manifest declares others). An MoE layer adds
        moe_input and router_logits; a dense layer has dense_mlp_out instead, which an MoE layer
        may have too (a shared expert).
        """
        graph = self.manifest.graphs["layers"][layer]
        names = [output.name for output in session.get_outputs()]
        is_moe = self.config.is_moe_layer(layer)
        required = ["residual"] + [f"present_{name}" for name, _ in self.config.cache_tensors()]
        required += ["moe_input", "router_logits"] if is_moe else ["dense_mlp_out"]
        missing = [name for name in required if name not in names]
        if missing:
            kind = "an MoE" if is_moe else "a dense"
            raise BundleError(f"layer graph {graph} lacks the output(s) {', '.join(missing)}, which "
                              f"{kind} layer needs; re-export the checkpoint")
        if not is_moe and "router_logits" in names:
            raise BundleError(f"layer graph {graph} has router_logits, but the manifest marks layer {layer} "
                              "as dense; re-export the checkpoint")
        return names

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers, self.config.cache_tensors())

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
        previous = None  # experts chosen at the previous MoE layer, [T, K]
        predictions: dict[str, np.ndarray] = {}  # predictor name -> predicted experts [T, K] for this layer
        for layer, session in enumerate(self.layers):
            outputs = dict(zip(self.layer_outputs[layer], session.run(None, {
                "hidden": hidden, "position_ids": positions, **cache.inputs(layer)})))
            cache.update(layer, outputs)

            moe_out = None
            if "router_logits" in outputs:
                weights, experts = self.route(outputs["router_logits"], self.config.num_experts_per_tok,
                                              self.config.norm_topk_prob,
                                              **self.config.routing_arguments(layer))  # [T, K], [T, K]
                for name, predicted in predictions.items():
                    self.meters[name].record(layer, predicted, experts)
                self.routing.record(layer, experts, previous)
                self.store.begin_layer(layer, {(layer, int(e)) for e in np.unique(experts)})
                predictions = self._predict_next(layer, experts, outputs.get("next_router_logits"))
                moe_out = self.moe(layer, outputs["moe_input"], weights, experts)  # [T, H]
                previous = experts
            hidden = outputs["residual"] + self.mlp_block(moe_out, outputs.get("dense_mlp_out"))  # [T, H]

        if self.preloader is not None:
            self._preload_first_layer()
        if not all_logits:
            hidden = hidden[-1:]                                                  # [1, H]
        (logits,) = self.head.run(None, {"hidden": hidden})                       # [T, V]
        return logits

    def _predict_next(self, layer: int, experts: np.ndarray, lookahead: np.ndarray | None) -> dict:
        """Measure every predictor for layer + 1 and hand the active one's choice to the preloader."""
        following = layer + 1
        if following >= self.config.num_hidden_layers or not self.config.is_moe_layer(following):
            # NOTE: predictions skip no dense layer: the next layer must be an MoE layer.
            return {}
        k = self.config.num_experts_per_tok
        if lookahead is not None and self.choice_logits is not None:
            lookahead = self.choice_logits(lookahead, **self.config.routing_arguments(following))  # [T, E]
        predictions = {name: top_experts(p.scores(following, experts, lookahead), k)
                       for name, p in self._meter_predictors.items()}
        if self.preloader is None or not self._worth_preloading(following):
            return predictions
        scores = self.predictor.scores(following, experts, lookahead)             # [T, E]
        chosen = top_experts(scores, k)                                           # [T, K]
        wanted = self._ranked_keys(following, scores, chosen)
        # Further ahead, the table chains from the predicted experts.
        for depth in range(2, self.options.preload_depth + 1):
            ahead = layer + depth
            if ahead >= self.config.num_hidden_layers or not self.config.is_moe_layer(ahead):
                break
            scores = TablePredictor.scores(self.predictor, ahead, chosen, None)
            chosen = top_experts(scores, k)
            wanted += self._ranked_keys(ahead, scores, chosen)
        self.preloader.request(wanted)
        return predictions

    def _worth_preloading(self, layer: int) -> bool:
        """Return whether the active predictor has predicted `layer` well enough so far.

        Below `preload_min_recall`, most preloads are wrong: each one reads an expert from storage
        and may evict a useful one, which costs more than it saves when reads are slow.
        """
        meter = self.meters.get(self.predictor.name)
        if meter is None or meter.total[layer] < 4 * self.config.num_experts_per_tok:
            return True
        return meter.hits[layer] >= self.options.preload_min_recall * meter.total[layer]

    @staticmethod
    def _ranked_keys(layer: int, scores: np.ndarray, chosen: np.ndarray) -> list[tuple[int, int]]:
        """Distinct predicted experts of all tokens, the highest summed score first."""
        unique = np.unique(chosen)
        totals = scores[:, unique].sum(axis=0)
        return [(layer, int(unique[i])) for i in np.argsort(-totals, kind="stable")]

    def _preload_first_layer(self) -> None:
        """After the last layer, queue the first MoE layer's most frequent experts for the next token."""
        first = self.moe_layers[0] if self.moe_layers else None
        if first is None:
            return
        shares = self.routing.shares()[first]
        best = np.argsort(-shares, kind="stable")[:self.config.num_experts_per_tok]
        self.preloader.request([(first, int(e)) for e in best])

    def mlp_block(self, moe_out: np.ndarray | None, dense_out: np.ndarray | None) -> np.ndarray:
        """Compute the output [T, H] of one layer's MLP block, to be added to the residual.

        The output is the routed experts' weighted sum plus `dense_mlp_out` (a shared expert, or
        the whole MLP of a dense layer), added in the order transformers adds them, times the
        config's residual_multiplier.
        """
        out = moe_out
        if dense_out is not None:
            out = dense_out if out is None else out + dense_out
        if self.config.residual_multiplier != 1.0:
            out = out * np.float32(self.config.residual_multiplier)
        return out

    def moe(self, layer: int, x: np.ndarray, weights: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Weighted sum of the chosen experts' outputs for x [T, H], weights and experts [T, K].

        Each chosen expert runs once, on all the tokens routed to it; resident experts run first,
        so experts still loading (demand or preload) get the most time. The outputs are summed in
        expert index order. Float addition is not associative, so with more than two experts per
        token an order that follows residency would make the logits depend on the cache.
        """
        outputs = {}  # expert -> (rows, slots, its output [t, H])
        order = sorted(np.unique(experts), key=lambda e: not self.store.is_resident((layer, int(e))))
        for expert in order:
            rows, slots = np.nonzero(experts == expert)                           # tokens routed here
            session = self.store.acquire(layer, int(expert))
            try:
                (y,) = session.run(None, {"x": x[rows]})                          # [t, H]
            finally:
                self.store.release(layer, int(expert))
            outputs[int(expert)] = (rows, slots, y)
        out = np.zeros_like(x)                                                    # [T, H]
        for expert in sorted(outputs):
            rows, slots, y = outputs[expert]
            out[rows] += weights[rows, slots][:, None] * y
        return out
