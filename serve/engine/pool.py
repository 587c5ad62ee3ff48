"""The adapter cache: resident slots <- host RAM <- the registry (whose local cache is verified on fetch).

Loading (fetch, sha256 verification, parsing into tensors) runs on a background thread, so a cold
adapter never stalls rows that are already running; installing the tensors into the layers' slot
tables is quick and happens on the engine thread between steps. Resident slots are evicted LRU,
never while a row uses them or while pinned; unloading an adapter in use drains its rows first.

Every method except the loader job runs with the engine's lock held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hotswap.errors import ArtifactRejected, CapacityExceeded, HotswapError
from hotswap.methods import load_adapter
from hotswap.methods.api import BaseInfo, LoadedAdapter
from hotswap.registry import Registry
from hotswap.serve.engine.types import EngineObserver
from hotswap.serve.model.layers import MultiAdapterModule
from hotswap.serve.model.rowkinds import EngineKinds

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0  # a request's adapter was resident when it arrived
    misses: int = 0  # a request's adapter had to be installed or loaded first
    host_hits: int = 0  # installed from host RAM, no registry read
    registry_loads: int = 0  # fetched + verified + parsed from the registry
    evictions: int = 0  # resident slots reclaimed (LRU or unload)
    load_seconds: float = 0.0  # total background load time


class AdapterPool:
    def __init__(
        self,
        registry: Registry,
        base: BaseInfo,
        base_fingerprint: str,
        layers: dict[str, MultiAdapterModule],
        kinds: EngineKinds,
        max_resident: int,
        host_cache_bytes: int,
        max_rank: int,
        lock: threading.Condition,
        observer: EngineObserver,
    ) -> None:
        self.registry, self.base, self.base_fingerprint = registry, base, base_fingerprint
        self.layers, self.kinds = layers, kinds
        self.max_resident, self.host_cache_bytes = max_resident, host_cache_bytes
        self.max_rank = max_rank
        self.lock = lock
        self.observer = observer
        self.slot_of: dict[str, int] = {}  # exact ref ("name@3") -> slot
        self.ref_at: list[str | None] = [None] * (max_resident + 1)
        self.resident: dict[int, LoadedAdapter] = {}
        self.refcount = [0] * (max_resident + 1)
        self.pinned: set[str] = set()
        self.lru: OrderedDict[str, None] = OrderedDict()  # resident refs, least recently used first
        self.host: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._host_nbytes: dict[str, int] = {}  # each host entry's bytes, counted once when it arrives
        self.loading: set[str] = set()
        self.failed: dict[str, HotswapError] = {}  # loads that failed since the engine's last admission pass
        self.draining: set[str] = set()
        self.stats = CacheStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotswap-loader")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- loading (background) --------------------------------------------------------------------
    def note_request(self, ref: str) -> None:
        """A request for ``ref`` arrived: count a resident hit or miss, and start loading it if needed."""
        hit = ref in self.slot_of
        if hit:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            self.ensure_loading(ref)
        self.observer.cache_event("resident", "hit" if hit else "miss")

    def ensure_loading(self, ref: str) -> None:
        if ref in self.slot_of or ref in self.host or ref in self.loading or ref in self.failed:
            return
        self.loading.add(ref)
        self.observer.cache_event("host", "miss")
        self._executor.submit(self._load, ref)

    def _load(self, ref: str) -> None:
        start = time.perf_counter()
        try:
            _, loaded = self.registry.fetch_read(
                ref,
                lambda m, path: load_adapter(path, m.ref, m.method, self.base),
                base_fingerprint=self.base_fingerprint,
            )
            if loaded.rank > self.max_rank:
                raise CapacityExceeded(f"{ref} has rank {loaded.rank}; this engine serves ranks up to {self.max_rank}")
        except HotswapError as e:
            log.warning("loading %s failed: %s", ref, e)
            with self.lock:
                self.loading.discard(ref)
                self.failed[ref] = e
                self.lock.notify_all()
            return
        except Exception as e:  # e.g. an unreadable file: report it on the requests, keep serving
            log.exception("loading %s failed", ref)
            with self.lock:
                self.loading.discard(ref)
                self.failed[ref] = ArtifactRejected(f"{ref}: could not be loaded ({type(e).__name__}: {e})")
                self.lock.notify_all()
            return
        elapsed = time.perf_counter() - start
        with self.lock:
            self.loading.discard(ref)
            self.stats.registry_loads += 1
            self.stats.load_seconds += elapsed
            self.observer.adapter_loaded("registry", elapsed)
            size = self._host_put(ref, loaded)
            self.lock.notify_all()
        log.info("loaded %s (%s, %.1f KiB) in %.1f ms", ref, loaded.method, size / 1024, elapsed * 1e3)

    def _host_put(self, ref: str, loaded: LoadedAdapter) -> int:
        """Keep ``loaded`` in host RAM, dropping the least recently used entries over the budget; its bytes."""
        self.host[ref] = loaded
        self.host.move_to_end(ref)
        size = self._host_nbytes[ref] = loaded.nbytes
        total = sum(self._host_nbytes.values())
        while total > self.host_cache_bytes and len(self.host) > 1:
            old, _ = self.host.popitem(last=False)
            total -= self._host_nbytes.pop(old)
            self.observer.cache_event("host", "eviction")
            log.debug("host cache dropped %s", old)
        return size

    def _host_drop(self, ref: str) -> None:
        self.host.pop(ref, None)
        self._host_nbytes.pop(ref, None)

    # -- residency (engine thread) ---------------------------------------------------------------
    def install(self, ref: str) -> int | None:
        """The slot holding ``ref``, installing it from host RAM if needed; None if not ready or no slot free.
        Raises ArtifactRejected (slot left empty) if installing fails."""
        if ref in self.draining:
            return None
        slot = self.slot_of.get(ref)
        if slot is not None:
            self.lru.move_to_end(ref)
            return slot
        loaded = self.host.get(ref)
        if loaded is None:
            self.ensure_loading(ref)
            return None
        slot = self._free_slot()
        if slot is None:
            return None
        start = time.perf_counter()
        try:
            for name, layer in self.layers.items():
                layer.set_slot(slot, loaded.linear.get(name))
            self.kinds.set_slot(slot, loaded.parts)
        except Exception as e:  # the loader checked it against the base, so this is a bug: keep it to ref
            log.exception("installing %s failed", ref)
            self._clear(slot)
            self._host_drop(ref)
            raise ArtifactRejected(f"{ref}: could not be installed ({type(e).__name__}: {e})") from e
        self.slot_of[ref], self.ref_at[slot], self.resident[slot] = slot, ref, loaded
        self.lru[ref] = None
        self.host.move_to_end(ref)
        self.stats.host_hits += 1
        self.observer.cache_event("host", "hit")
        self.observer.adapter_loaded("host", time.perf_counter() - start)
        return slot

    def _free_slot(self) -> int | None:
        for slot in range(1, self.max_resident + 1):
            if self.ref_at[slot] is None:
                return slot
        for ref in self.lru:  # least recently used first
            slot = self.slot_of[ref]
            if self.refcount[slot] == 0 and ref not in self.pinned:
                self._evict(ref)
                return slot
        return None

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.set_slot(slot, None)
        self.kinds.set_slot(slot, {})

    def _evict(self, ref: str) -> None:
        slot = self.slot_of.pop(ref)
        self._clear(slot)
        self.ref_at[slot] = None
        del self.resident[slot]
        self.lru.pop(ref, None)
        self.stats.evictions += 1
        self.observer.cache_event("resident", "eviction")
        log.debug("evicted %s from slot %d", ref, slot)

    def acquire(self, slot: int) -> None:
        self.refcount[slot] += 1

    def release(self, slot: int) -> None:
        self.refcount[slot] -= 1
        ref = self.ref_at[slot]
        if self.refcount[slot] == 0 and ref in self.draining:
            self._finish_unload(ref)

    def pin(self, ref: str, pinned: bool) -> None:
        (self.pinned.add if pinned else self.pinned.discard)(ref)

    def unload(self, ref: str) -> None:
        """Stop admitting rows for ``ref``; free its slot once the rows using it have finished."""
        self.pinned.discard(ref)
        self._host_drop(ref)
        slot = self.slot_of.get(ref)
        if slot is None:
            return
        self.draining.add(ref)
        if self.refcount[slot] == 0:
            self._finish_unload(ref)

    def _finish_unload(self, ref: str) -> None:
        self.draining.discard(ref)
        self._evict(ref)
        self.lock.notify_all()
