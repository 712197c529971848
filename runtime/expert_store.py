"""The expert store: experts loaded on demand or preloaded into a cache bounded by a byte budget.

The store owns the accounting: resident plus in-flight expert bytes never exceed the budget.
It also owns the statistics and the pins of experts in use. The eviction policy chooses
victims, and `expert_session` creates the sessions.

Loading happens outside the store's lock, so the compute thread can use resident experts while
the I/O thread loads another. Each load has an `_InFlight` record; a demand for an expert that
is being preloaded waits for that load instead of starting a second one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgemoe.runtime.eviction import EvictionPolicy, ExpertKey, LRUPolicy
from edgemoe.runtime.manifest import BundleError, Manifest, check_expert_format, verify_file
from edgemoe.runtime.sessions import expert_session

logger = logging.getLogger(__name__)


class BudgetTooSmallError(ValueError):
    """The expert budget cannot hold the experts one layer needs at once."""


@dataclass
class StoreStats:
    """Counters of the expert store since it was created."""

    loads: int = 0  # sessions created (on demand and preloaded)
    hits: int = 0  # requests served by a resident expert
    misses: int = 0  # requests that found the expert neither resident nor in flight
    inflight_hits: int = 0  # requests that waited for a preload already in flight
    evictions: int = 0
    bytes_read: int = 0  # bytes of expert files loaded from storage
    load_seconds: float = 0.0  # time spent creating sessions, on any thread
    stall_seconds: float = 0.0  # time the compute thread waited for experts (loads and in-flight waits)
    preloads: int = 0  # loads started by the preloader
    preloads_used: int = 0  # preloaded experts requested before their eviction
    preloads_dropped: int = 0  # preload requests skipped: no room without evicting needed experts
    peak_resident_bytes: int = 0  # max of resident + in-flight bytes

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Resident:
    session: ort.InferenceSession
    bytes: int
    pins: int = 0
    preloaded: bool = False  # loaded by the preloader and not requested yet


@dataclass
class _InFlight:
    bytes: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    preload: bool = False


def _malloc_trim():
    """Return glibc's malloc_trim, or None elsewhere. glibc keeps freed heap memory until
    malloc_trim(0) returns it, so without it RSS would not follow the accounting."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


class ExpertStore:
    """Loads expert sessions and keeps them within `budget_bytes`.

    Args:
        bundle_dir: the bundle directory.
        manifest: its manifest.
        budget_bytes: maximum resident plus in-flight expert bytes (`ExpertEntry.resident_bytes`).
        policy: eviction policy (LRU when omitted).
        verify: check each expert file's sha256 the first time it is loaded.
        keep_only_current_layer: evict every unpinned expert of other layers when a layer starts
            (the "on-demand" baseline: nothing is reused across layers or tokens).

    Raises:
        BudgetTooSmallError: the budget is below `manifest.min_expert_budget`.
    """

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, budget_bytes: int,
                 policy: EvictionPolicy | None = None, verify: bool = True,
                 keep_only_current_layer: bool = False):
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
        self.keep_only_current_layer = keep_only_current_layer
        self.stats = StoreStats()
        self.current_layer = 0
        self.needed: set[ExpertKey] = set()  # experts the current layer still has to run
        self._visits = 0  # layers started so far
        self._last_use: dict[ExpertKey, int] = {}  # expert -> value of _visits at its last use
        self._resident: dict[ExpertKey, _Resident] = {}
        self._inflight: dict[ExpertKey, _InFlight] = {}
        self._used_bytes = 0  # resident + in flight
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._trim = _malloc_trim()

    # State

    @property
    def resident_bytes(self) -> int:
        """Bytes of resident and in-flight experts (what the budget bounds)."""
        return self._used_bytes

    def resident_keys(self) -> list[ExpertKey]:
        return list(self._resident)

    def inflight_keys(self) -> list[ExpertKey]:
        return list(self._inflight)

    def snapshot(self) -> tuple[int, list[ExpertKey], list[ExpertKey]]:
        """Accounted bytes, resident keys and in-flight keys, read together under the lock."""
        with self._lock:
            return self._used_bytes, list(self._resident), list(self._inflight)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._resident

    def is_available(self, key: ExpertKey) -> bool:
        """Return whether the expert is resident or being loaded."""
        return key in self._resident or key in self._inflight

    def begin_layer(self, layer: int, needed: set[ExpertKey]) -> None:
        """Tell the store which layer runs now and which experts it needs (they are evicted last)."""
        with self._lock:
            self.current_layer = layer
            self.needed = set(needed)
            self._visits += 1
            self.policy.on_layer(layer)
            if self.keep_only_current_layer:
                stale = [k for k, e in self._resident.items() if k[0] != layer and e.pins == 0]
                for key in stale:
                    self._evict(key)
                if stale:
                    self._after_evictions()

    # Demand path (compute thread)

    def acquire(self, layer: int, index: int) -> ort.InferenceSession:
        """Return the expert's session, loading it if needed, and pin it until `release`.

        Raises:
            BundleError: the expert file failed verification or loading.
            BudgetTooSmallError: pinned experts leave no room for this one.
        """
        key = (layer, index)
        started = time.perf_counter()
        waited = False  # a miss or an in-flight wait was counted already
        while True:
            with self._lock:
                entry = self._resident.get(key)
                if entry is not None:
                    if not waited:
                        self.stats.hits += 1
                    if entry.preloaded:
                        entry.preloaded = False
                        self.stats.preloads_used += 1
                    self.policy.on_access(key)
                    self._last_use[key] = self._visits
                    entry.pins += 1
                    self.stats.stall_seconds += time.perf_counter() - started
                    return entry.session
                flight = self._inflight.get(key)
                if flight is None:
                    self.stats.misses += 1
                    flight = self._reserve(key, preload=False, protect=set())
                    owner = True
                else:
                    self.stats.inflight_hits += 1
                    owner = False
                waited = True
            if owner:
                self._complete(key, flight)
            else:
                flight.done.wait()
                if flight.error is not None:
                    raise BundleError(f"expert {index} of layer {layer} failed to load: {flight.error}") \
                        from flight.error
            # Loop: the expert is now resident (or was evicted right away, then load again).

    def release(self, layer: int, index: int) -> None:
        with self._lock:
            entry = self._resident[(layer, index)]
            assert entry.pins > 0, f"expert {(layer, index)} released more often than acquired"
            entry.pins -= 1

    # Preload path (I/O thread)

    def preload(self, key: ExpertKey) -> bool:
        """Load an expert without pinning it; return False when it is already available or there
        is no room without evicting experts the current layer needs."""
        with self._lock:
            if key in self._resident or key in self._inflight:
                return False
            # A preload only takes room from experts unused for a whole pass over the layers, so a
            # wrong prediction never displaces what the last token used.
            horizon = self._visits - self.manifest.config.num_hidden_layers
            recent = {k for k, visit in self._last_use.items() if visit > horizon}
            try:
                flight = self._reserve(key, preload=True, protect=self.needed | recent)
            except BudgetTooSmallError:
                self.stats.preloads_dropped += 1
                return False
            self.stats.preloads += 1
        try:
            self._complete(key, flight)
        except Exception as exc:  # the demand path reports it to its caller; log it here once
            # The demand path raises this error to the request that needs the expert.
            logger.info("preloading expert %d of layer %d failed: %s", key[1], key[0], exc)
            return False
        return True

    # Housekeeping

    def clear(self) -> None:
        """Drop every unpinned expert."""
        with self._lock:
            for key in [k for k, e in self._resident.items() if e.pins == 0]:
                self._evict(key)
            self._after_evictions()

    # Internals (called with the lock held unless noted)

    def _reserve(self, key: ExpertKey, preload: bool, protect: set[ExpertKey]) -> _InFlight:
        size = self.manifest.expert(*key).resident_bytes
        self._make_room(size, protect)
        flight = _InFlight(bytes=size, preload=preload)
        self._inflight[key] = flight
        self._used_bytes += size
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self._used_bytes)
        self._check_invariant()
        return flight

    def _complete(self, key: ExpertKey, flight: _InFlight) -> None:
        """Load outside the lock, then publish the session (or the error) and wake waiters."""
        started = time.perf_counter()
        try:
            session = self._load(*key)
            if flight.preload:
                self._warm_up(session)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
                self._used_bytes -= flight.bytes
                flight.error = exc
            flight.done.set()
            raise
        elapsed = time.perf_counter() - started
        with self._lock:
            self._inflight.pop(key, None)
            self._resident[key] = _Resident(session, flight.bytes, pins=0, preloaded=flight.preload)
            self.policy.on_insert(key)
            self.stats.loads += 1
            self.stats.load_seconds += elapsed
            self.stats.bytes_read += self.manifest.expert(*key).bytes
            self._check_invariant()
        flight.done.set()

    def _make_room(self, size: int, protect: set[ExpertKey]) -> None:
        evicted = False
        while self._used_bytes + size > self.budget_bytes:
            unpinned = [k for k, e in self._resident.items() if e.pins == 0]
            victim = self.policy.choose_victim([k for k in unpinned if k not in self.needed and k not in protect])
            if victim is None and not protect:
                # A demand load may evict an expert this layer needs later: it reloads then.
                victim = self.policy.choose_victim(unpinned)
            if victim is None:
                raise BudgetTooSmallError(
                    f"expert budget {self.budget_bytes} bytes cannot hold the {len(self._resident)} "
                    f"resident and {len(self._inflight)} in-flight experts in use plus one of {size} "
                    "bytes; raise --expert-budget")
            self._evict(victim)
            evicted = True
        if evicted:
            self._after_evictions()

    def _evict(self, key: ExpertKey) -> None:
        entry = self._resident.pop(key)
        self._last_use.pop(key, None)
        self._used_bytes -= entry.bytes
        self.policy.on_remove(key)
        self.stats.evictions += 1

    def _after_evictions(self) -> None:
        if self._trim is not None:
            self._trim(0)

    def _load(self, layer: int, index: int) -> ort.InferenceSession:
        """Verify (first time only) and create the session; runs without the lock."""
        entry = self.manifest.expert(layer, index)
        if self.verify:
            for name in (entry.file, entry.data_file):
                if name not in self._verified:
                    verify_file(self.bundle_dir, self.manifest, name)
                    self._verified.add(name)
        path = self.bundle_dir / entry.file
        try:
            session = expert_session(str(path), prepack=entry.quantized)
        except Exception as exc:  # onnxruntime raises several exception types for bad files
            raise BundleError(f"failed to load expert {index} of layer {layer} from {path}: {exc}") from exc
        check_expert_format(path, entry, session.get_modelmeta().custom_metadata_map)
        logger.debug("loaded expert %d of layer %d (%d bytes)", index, layer, entry.bytes)
        return session

    def _warm_up(self, session: ort.InferenceSession) -> None:
        """Run a preloaded expert once on one zero token, on the I/O thread.

        The first run of a session faults its mapped weights in from storage and sets up its
        kernels; doing it here keeps that cost off the compute thread.
        """
        hidden = self.manifest.config.hidden_size
        session.run(None, {"x": np.zeros((1, hidden), np.float32)})

    def _check_invariant(self) -> None:
        resident = sum(e.bytes for e in self._resident.values())
        inflight = sum(f.bytes for f in self._inflight.values())
        assert self._used_bytes == resident + inflight, "expert byte accounting is inconsistent"
        assert self._used_bytes <= self.budget_bytes, (
            f"resident + in-flight expert bytes {self._used_bytes} exceed the budget {self.budget_bytes}")
