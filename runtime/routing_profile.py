"""Routing statistics: how often each expert is chosen, and how often expert e is chosen at layer
l+1 when expert p was chosen at layer l. Recorded by `edgemoe profile` into the bundle (as
`routing_profile.npz`), and kept up to date while the model runs, so predictors work without one.

Shapes: L layers, E experts, T tokens, K experts per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, sha256_file

PROFILE_NAME = "routing_profile.npz"


class RoutingStats:
    # Normalised tables are cached and rebuilt after this many new tokens, because rebuilding
    # them for every layer of every token costs more than the prediction itself.
    REFRESH_TOKENS = 256

    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((num_layers, num_experts), np.int64)                        # [L, E]
        self.transitions = np.zeros((max(num_layers - 1, 0), num_experts, num_experts), np.int64)  # [L-1, E, E]
        self.tokens = 0
        self._cached_at = -1
        self._shares: np.ndarray | None = None
        self._conditional: np.ndarray | None = None

    def _refresh(self) -> None:
        # Early on the tables are rebuilt as the token count doubles, so they learn fast.
        fresh = self.tokens - self._cached_at < min(self.REFRESH_TOKENS, max(self._cached_at, 1))
        if self._shares is not None and fresh:
            return
        self._cached_at = self.tokens
        totals = self.counts.sum(axis=1, keepdims=True)
        uniform = np.full(self.counts.shape, 1.0 / self.counts.shape[1])
        self._shares = np.where(totals > 0, self.counts / np.maximum(totals, 1), uniform)
        table = self.transitions.astype(np.float64)
        row_totals = table.sum(axis=2, keepdims=True)
        self._conditional = np.where(row_totals > 0, table / np.maximum(row_totals, 1),
                                     1.0 / max(self.counts.shape[1], 1))

    def record(self, layer: int, experts: np.ndarray, previous: np.ndarray | None) -> None:
        """Add one layer's choices: experts [T, K] at `layer`, previous [T, K] at the MoE layer
        before it (None at the first MoE layer, where the tokens are counted)."""
        np.add.at(self.counts[layer], experts.reshape(-1), 1)
        if previous is None:
            # The first MoE layer, which is not layer 0 when the model starts with dense layers.
            self.tokens += experts.shape[0]
        if previous is not None:
            # Every (p at layer-1, e at layer) pair of one token counts once.
            pairs_p = np.repeat(previous, experts.shape[1], axis=1).reshape(-1)           # [T*K*K]
            pairs_e = np.tile(experts, (1, previous.shape[1])).reshape(-1)               # [T*K*K]
            np.add.at(self.transitions[layer - 1], (pairs_p, pairs_e), 1)

    def shares(self) -> np.ndarray:
        """[L, E] each expert's share of its layer's activations (uniform before any data)."""
        self._refresh()
        return self._shares

    def conditional(self, layer: int) -> np.ndarray:
        """[E, E] P(e at `layer` | p at `layer - 1`), rows p; a row with no data is uniform."""
        self._refresh()
        return self._conditional[layer - 1]

    def merge(self, other: "RoutingStats") -> None:
        self.counts += other.counts
        self.transitions += other.transitions
        self.tokens += other.tokens

    # Files

    def save(self, bundle_dir: str | Path, manifest: Manifest, source: str) -> None:
        """Write the profile into the bundle and list it in the manifest."""
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / PROFILE_NAME
        with open(path, "wb") as f:
            np.savez(f, counts=self.counts, transitions=self.transitions, tokens=np.array(self.tokens))
        manifest.files[PROFILE_NAME] = FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
        manifest.routing_profile = {"file": PROFILE_NAME, "tokens": int(self.tokens), "source": source}
        (bundle_dir / MANIFEST_NAME).write_text(manifest.to_json())

    @classmethod
    def load(cls, bundle_dir: str | Path, manifest: Manifest) -> "RoutingStats | None":
        """The bundle's recorded profile, or None when it has none."""
        if not manifest.routing_profile:
            return None
        with np.load(Path(bundle_dir) / manifest.routing_profile["file"], allow_pickle=False) as data:
            stats = cls(*data["counts"].shape)
            stats.counts[...] = data["counts"]
            stats.transitions[...] = data["transitions"]
            stats.tokens = int(data["tokens"])
        return stats

    def describe(self) -> dict:
        return {"tokens": self.tokens, "layers": int(self.counts.shape[0]), "experts": int(self.counts.shape[1])}
