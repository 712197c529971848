"""The expert store: experts loaded on demand into a cache bounded by a byte budget.

The store owns the accounting (resident bytes never exceed the budget), the statistics, and the
pinning of experts in use; the eviction policy chooses victims, and the loader creates sessions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from edgemoe.runtime.eviction import EvictionPolicy, ExpertKey, LRUPolicy
from edgemoe.runtime.manifest import BundleError, Manifest, verify_file
from edgemoe.runtime.sessions import expert_session

logger = logging.getLogger(__name__)


class BudgetTooSmallError(ValueError):
    """The expert budget cannot hold the experts one layer needs at once."""


@dataclass
class StoreStats:
    """Counters of the expert store since it was created or last reset."""

    loads: int = 0  # sessions created
    hits: int = 0  # requests served by a resident expert
    misses: int = 0  # requests that had to load
    evictions: int = 0
    bytes_read: int = 0  # bytes of expert files loaded from storage
    load_seconds: float = 0.0  # time spent creating sessions on demand (a stall for the caller)
    peak_resident_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Resident:
    session: ort.InferenceSession
    bytes: int
    pins: int = 0


def _malloc_trim():
    """glibc keeps freed heap memory; malloc_trim(0) returns it so RSS follows the accounting."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


class ExpertStore:
    """Loads expert sessions on demand and keeps them within `budget_bytes`.

    Args:
        bundle_dir: the bundle directory.
        manifest: its manifest.
        budget_bytes: maximum resident expert bytes (as counted by `ExpertEntry.resident_bytes`).
        policy: eviction policy (LRU when omitted).
        verify: check each expert file's sha256 the first time it is loaded.

    Raises:
        BudgetTooSmallError: the budget is below `manifest.min_expert_budget`.
    """

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, budget_bytes: int,
                 policy: EvictionPolicy | None = None, verify: bool = True):
        minimum = manifest.min_expert_budget
        if budget_bytes < minimum:
            raise BudgetTooSmallError(
                f"expert budget {budget_bytes} bytes is smaller than one layer's top-"
                f"{manifest.config.num_experts_per_tok} experts ({minimum} bytes); "
                f"set --expert-budget to at least {minimum} bytes ({minimum / 1e6:.2f} MB)")
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.budget_bytes = budget_bytes
        self.policy = policy or LRUPolicy()
        self.verify = verify
        self.stats = StoreStats()
        self._resident: dict[ExpertKey, _Resident] = {}
        self._resident_bytes = 0
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._trim = _malloc_trim()

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def resident_keys(self) -> list[ExpertKey]:
        return list(self._resident)

    def acquire(self, layer: int, index: int) -> ort.InferenceSession:
        """Return the expert's session, loading it if needed, and pin it until `release`."""
        key = (layer, index)
        with self._lock:
            entry = self._resident.get(key)
            if entry is not None:
                self.stats.hits += 1
                self.policy.on_access(key)
                entry.pins += 1
                return entry.session
            self.stats.misses += 1
            size = self.manifest.expert(layer, index).resident_bytes
            self._make_room(size)
            session = self._load(layer, index)
            self._resident[key] = _Resident(session, size, pins=1)
            self._resident_bytes += size
            self.policy.on_insert(key)
            self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self._resident_bytes)
            self._check_invariant()
            return session

    def release(self, layer: int, index: int) -> None:
        with self._lock:
            entry = self._resident[(layer, index)]
            assert entry.pins > 0, f"expert {(layer, index)} released more often than acquired"
            entry.pins -= 1

    def clear(self) -> None:
        """Drop every unpinned expert."""
        with self._lock:
            for key in [k for k, e in self._resident.items() if e.pins == 0]:
                self._evict(key)
            self._after_evictions()

    def _make_room(self, size: int) -> None:
        evicted = False
        while self._resident_bytes + size > self.budget_bytes:
            candidates = [k for k, e in self._resident.items() if e.pins == 0]
            victim = self.policy.choose_victim(candidates)
            if victim is None:
                raise BudgetTooSmallError(
                    f"expert budget {self.budget_bytes} bytes cannot hold the {len(self._resident)} pinned "
                    f"experts plus one of {size} bytes; raise --expert-budget")
            self._evict(victim)
            evicted = True
        if evicted:
            self._after_evictions()

    def _evict(self, key: ExpertKey) -> None:
        entry = self._resident.pop(key)
        self._resident_bytes -= entry.bytes
        self.policy.on_remove(key)
        self.stats.evictions += 1
        del entry

    def _after_evictions(self) -> None:
        if self._trim is not None:
            self._trim(0)

    def _load(self, layer: int, index: int) -> ort.InferenceSession:
        entry = self.manifest.expert(layer, index)
        started = time.perf_counter()
        if self.verify:
            for name in (entry.file, entry.data_file):
                if name not in self._verified:
                    verify_file(self.bundle_dir, self.manifest, name)
                    self._verified.add(name)
        try:
            session = expert_session(str(self.bundle_dir / entry.file))
        except Exception as exc:  # onnxruntime raises several exception types for bad files
            raise BundleError(f"failed to load expert {index} of layer {layer} from "
                              f"{self.bundle_dir / entry.file}: {exc}") from exc
        self.stats.loads += 1
        self.stats.bytes_read += entry.bytes
        self.stats.load_seconds += time.perf_counter() - started
        logger.debug("loaded expert %d of layer %d (%d bytes)", index, layer, entry.bytes)
        return session

    def _check_invariant(self) -> None:
        assert self._resident_bytes == sum(e.bytes for e in self._resident.values())
        assert self._resident_bytes <= self.budget_bytes, (
            f"resident expert bytes {self._resident_bytes} exceed the budget {self.budget_bytes}")
