"""The registry API: publish immutable versions, resolve refs, fetch verified files, move aliases.

This is the one place that knows what a ref means (``latest``, aliases, versions), that checks
integrity and base fingerprints, and that builds manifests; backends only store bytes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from hotswap.errors import (
    AdapterNotFound,
    BaseModelMismatch,
    IntegrityError,
    InvalidAdapterRef,
    InvalidArgument,
    InvalidArtifact,
)
from hotswap.fsutil import atomic_copy_tree
from hotswap.registry.artifact import detect_method, hash_files, scan_artifact, verify
from hotswap.registry.backend import Backend, check_record
from hotswap.registry.local import LocalBackend
from hotswap.registry.manifest import MANIFEST_FILE, VISIBILITIES, Lineage, Manifest
from hotswap.registry.refs import LATEST, AdapterRef, check_alias, check_part

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_REGISTRY = "HOTSWAP_REGISTRY"
DEFAULT_ROOT = Path("~/.cache/hotswap/registry")
REMOTE_RESOLVE_TTL = 2.0  # seconds a remote registry's alias or latest, once resolved, is reused
MAX_CACHED_RESOLVES = 4096  # resolved refs a Registry keeps (least recently used go first)


def default_registry_url() -> str:
    """``$HOTSWAP_REGISTRY`` if set, else ``~/.cache/hotswap/registry``."""
    return os.environ.get(ENV_REGISTRY) or str(DEFAULT_ROOT.expanduser())


def open_backend(url: str | os.PathLike[str]) -> Backend:
    """Pick the backend for a registry URL: ``hf://ORG`` (the Hub), ``file:///path`` or a plain path (local)."""
    text = os.fspath(url)
    if text.startswith("hf://"):
        from hotswap.registry.hub import HubBackend  # huggingface_hub is imported only when used

        return HubBackend(text)
    if text.startswith("file://"):
        return LocalBackend(text.removeprefix("file://"))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise InvalidArgument(f"unsupported registry URL scheme {scheme!r} in {text!r}; use hf://, file:// or a path")
    return LocalBackend(text)


@dataclass(frozen=True)
class AdapterSummary:
    name: str
    latest: int
    versions: int
    method: str  # of the latest version
    aliases: dict[str, int]
    visibility: str
    created_at: str  # of the latest version


def check_base(manifest: Manifest, base_fingerprint: str) -> Manifest:
    """``manifest`` if it was published for the base ``base_fingerprint``, else :class:`BaseModelMismatch`."""
    if manifest.base_fingerprint == base_fingerprint:
        return manifest
    if manifest.base_fingerprint is None:
        raise BaseModelMismatch(f"{manifest.ref} was published without a base fingerprint; republish it with --base")
    raise BaseModelMismatch(
        f"{manifest.ref} was trained for base {manifest.base_fingerprint[:19]}…, not {base_fingerprint[:19]}…"
    )


class _ResolveCache:
    """Refs already resolved: an exact version (immutable) until it is the least recently used of ``size``, an
    alias or ``latest`` for ``ttl`` seconds. A resolve that raced with :meth:`forget` is not kept."""

    def __init__(self, ttl: float, size: int = MAX_CACHED_RESOLVES) -> None:
        self.ttl, self.size = ttl, size
        self._lock = threading.Lock()
        self._entries: OrderedDict[AdapterRef, tuple[Manifest, float]] = OrderedDict()  # ref -> (manifest, expiry)
        self._generation = 0  # bumped by forget(): a resolve begun before it is stale

    def get(self, ref: AdapterRef) -> tuple[Manifest | None, int]:
        """(the cached manifest or None, the token to :meth:`put` a fresh one with)."""
        with self._lock:
            manifest, expires = self._entries.get(ref, (None, 0.0))
            if manifest is not None and time.monotonic() < expires:
                self._entries.move_to_end(ref)
                return manifest, self._generation
            self._entries.pop(ref, None)
            return None, self._generation

    def put(self, ref: AdapterRef, manifest: Manifest, token: int) -> None:
        """Keep ``manifest`` for ``ref`` and for its exact version (what an alias's user resolves next)."""
        exact = ref.at(manifest.version)
        with self._lock:
            if token != self._generation:
                return
            if ref != exact:
                self._entries[ref] = (manifest, time.monotonic() + self.ttl)
            self._entries[exact] = (manifest, math.inf)
            self._entries.move_to_end(exact)
            self._entries.move_to_end(ref)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, name: str) -> None:
        """Drop what may have moved for ``name`` (its aliases and latest) after this process wrote it."""
        with self._lock:
            self._generation += 1
            for ref in [r for r in self._entries if r.full_name == name and r.version is None]:
                del self._entries[ref]


def _as_ref(ref: str | AdapterRef) -> AdapterRef:
    return ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)


def _as_name(name: str | AdapterRef) -> AdapterRef:
    ref = _as_ref(name)
    if ref.version is not None or ref.alias is not None:
        raise InvalidAdapterRef(f"expected an adapter name without @version or :alias, got {str(ref)!r}")
    return ref


class Registry:
    """Adapter registry over one backend. ``Registry()`` opens the default local registry.

    ``resolve_ttl``: for how many seconds :meth:`resolve` reuses an alias or ``latest`` it resolved (exact
    versions, being immutable, are reused until evicted); 0 resolves everything afresh. By default a remote
    backend (the Hub) caches for :data:`REMOTE_RESOLVE_TTL` and the local one, whose resolves are file reads,
    not at all. This process's own publish and alias moves show at once; another writer's within the TTL."""

    def __init__(
        self, backend: Backend | str | os.PathLike[str] | None = None, *, resolve_ttl: float | None = None
    ) -> None:
        if backend is None:
            backend = default_registry_url()
        self.backend: Backend = open_backend(backend) if isinstance(backend, str | os.PathLike) else backend
        if resolve_ttl is None:
            resolve_ttl = 0.0 if isinstance(self.backend, LocalBackend) else REMOTE_RESOLVE_TTL
        if not resolve_ttl >= 0:
            raise InvalidArgument(f"resolve_ttl must be >= 0 seconds, got {resolve_ttl}")
        self._resolved = _ResolveCache(resolve_ttl) if resolve_ttl > 0 else None

    @property
    def url(self) -> str:
        return self.backend.url

    # -- publish -------------------------------------------------------------------------------
    def publish(
        self,
        src: str | os.PathLike[str],
        name: str | AdapterRef,
        *,
        method: str | None = None,
        base_fingerprint: str | None = None,
        aliases: tuple[str, ...] | list[str] = (),
        lineage: Lineage | None = None,
        metrics: dict | None = None,
        visibility: str | None = None,
        description: str = "",
        version: int | None = None,
        created_at: str | None = None,
        check: Callable[[Path, str], None] | None = None,
    ) -> Manifest:
        """Publish the artifact directory ``src`` as the next version of ``name`` and return its manifest.

        ``version`` pins the number (used when mirroring between registries); otherwise the next free
        number is allocated atomically. Aliases given are moved to the new version after it is visible.
        ``check(src, method)`` runs before anything is written and refuses the artifact by raising: the
        serving side's check against a base (``hotswap.methods.base_checker``); the registry knows
        no models.
        """
        ref = _as_name(name)
        for alias in aliases:
            check_alias(alias)
        src_path = Path(src)
        files = scan_artifact(src_path)
        method = check_part(method, "method") if method else detect_method(src_path)
        if check is not None:
            check(src_path, method)
        if visibility is None:
            visibility = "private" if ref.tenant else "public"
        if visibility not in VISIBILITIES:
            raise InvalidArtifact(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")
        if visibility == "private" and not ref.tenant:
            raise InvalidArtifact(f"{ref.full_name}: only tenant-scoped names (tenant/name) can be private")
        if version is not None and version < 1:
            raise InvalidAdapterRef(f"version must be a positive integer, got {version}")
        manifest = Manifest(
            name=ref.full_name,
            version=version or 0,
            method=method,
            files=hash_files(files),
            created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            base_fingerprint=base_fingerprint,
            lineage=lineage or Lineage(),
            metrics=dict(metrics or {}),
            visibility=visibility,
            tenant=ref.tenant,
            description=description,
        )
        manifest = self.backend.commit_version(files, manifest, pinned=version is not None)
        try:
            for alias in aliases:
                self.backend.write_alias(manifest.name, alias, manifest.version)
        finally:
            self._forget(manifest.name)  # its latest moved, and maybe aliases
        return manifest

    # -- resolve / fetch -----------------------------------------------------------------------
    def _version_of(self, ref: AdapterRef) -> int:
        name = ref.full_name
        versions = self.backend.list_versions(name)
        if not versions:
            raise AdapterNotFound(f"adapter {name!r} is not in registry {self.url}")
        if ref.version is not None:
            if ref.version not in versions:
                raise AdapterNotFound(f"{name} has no version {ref.version} (latest is {versions[-1]})")
            return ref.version
        if ref.alias is None or ref.alias == LATEST:
            return versions[-1]
        aliases = self.backend.read_aliases(name)
        if ref.alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise AdapterNotFound(f"{name} has no alias {ref.alias!r} (aliases: {known}; 'latest' always works)")
        return aliases[ref.alias]

    def resolve(self, ref: str | AdapterRef, *, base_fingerprint: str | None = None) -> Manifest:
        """The manifest ``ref`` points at now (within ``resolve_ttl`` for an alias or latest). With
        ``base_fingerprint``, refuse an adapter for another base."""
        ref = _as_ref(ref)
        if self._resolved is None:
            manifest = self.backend.read_manifest(ref.full_name, self._version_of(ref))
        else:
            manifest, token = self._resolved.get(ref)
            if manifest is None:
                manifest = self.backend.read_manifest(ref.full_name, self._version_of(ref))
                self._resolved.put(ref, manifest, token)
        return manifest if base_fingerprint is None else check_base(manifest, base_fingerprint)

    def _forget(self, name: str) -> None:
        """This process moved ``name``'s latest or an alias: resolve them afresh."""
        if self._resolved is not None:
            self._resolved.forget(name)

    def fetch(self, ref: str | AdapterRef, *, base_fingerprint: str | None = None) -> tuple[Manifest, Path]:
        """Resolve ``ref`` and return its manifest and a local directory whose files were just verified."""
        manifest = self.resolve(ref, base_fingerprint=base_fingerprint)
        path = self.backend.local_path(manifest.name, manifest.version)
        verify(path, manifest)
        return manifest, path

    def fetch_read(
        self, ref: str | AdapterRef, read: Callable[[Manifest, Path], T], *, base_fingerprint: str | None = None
    ) -> tuple[Manifest, T]:
        """:meth:`fetch`, with ``read(manifest, path)`` run on the files while they are being verified (hashing
        runs in another thread without the GIL, so a cold load pays for the slower of the two, not both). What
        ``read`` returns is handed over only once the files proved intact; if they did not, IntegrityError is
        raised whatever ``read`` did (an error of ``read`` on tampered files is reported as the tampering)."""
        manifest = self.resolve(ref, base_fingerprint=base_fingerprint)
        path = self.backend.local_path(manifest.name, manifest.version)
        with ThreadPoolExecutor(1, thread_name_prefix="hotswap-verify") as hashing:
            checked = hashing.submit(verify, path, manifest)
            try:
                value = read(manifest, path)
            finally:
                checked.result()  # IntegrityError wins over (and chains) whatever read raised
        return manifest, value

    def pull(self, ref: str | AdapterRef, dest: str | os.PathLike[str]) -> Manifest:
        """Copy a verified version (files + manifest) to a new directory ``dest``, atomically."""
        dest_path = Path(dest)
        if dest_path.exists():
            raise InvalidArtifact(f"{dest_path}: already exists; pull into a new directory")
        manifest, path = self.fetch(ref)
        atomic_copy_tree(
            {rel: path / rel for rel in manifest.files}, dest_path, {MANIFEST_FILE: manifest.to_json().encode()}
        )
        return manifest

    def mirror(self, src: Registry, names: list[str] | None = None) -> list[Manifest]:
        """Copy into this registry every version of ``names`` (default: all of ``src``) that it lacks,
        keeping version numbers, manifests (created_at, lineage, metrics, visibility) and aliases.
        A version present on both sides must have the same files, else :class:`IntegrityError`.

        The alias history is not copied: each registry keeps its own. An alias this moves is recorded
        here as a move of this registry's, with a record naming ``src``."""
        copied = []
        for name in names or src.names():
            have = set(self.backend.list_versions(_as_name(name).full_name))
            for m in src.versions(name):
                if m.version in have:
                    if self.backend.read_manifest(m.name, m.version).files != m.files:
                        raise IntegrityError(f"{m.ref} differs between {src.url} and {self.url}; not mirrored")
                    continue
                _, path = src.fetch(m.ref)
                copy = self.publish(
                    path,
                    m.name,
                    method=m.method,
                    base_fingerprint=m.base_fingerprint,
                    lineage=m.lineage,
                    metrics=m.metrics,
                    visibility=m.visibility,
                    description=m.description,
                    version=m.version,
                    created_at=m.created_at,
                )
                copied.append(copy)
            mine = self.backend.read_aliases(_as_name(name).full_name)
            record = {"summary": f"mirrored from {src.url}", "mirrored_from": src.url}
            for alias, version in src.aliases(name).items():
                if mine.get(alias) != version:
                    self.backend.write_alias(_as_name(name).full_name, alias, version, record)
            self._forget(_as_name(name).full_name)
        return copied

    # -- listing -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.backend.list_names()

    def list(self) -> list[AdapterSummary]:
        out = []
        for name in self.backend.list_names():
            versions = self.backend.list_versions(name)
            latest = self.backend.read_manifest(name, versions[-1])
            out.append(
                AdapterSummary(
                    name=name,
                    latest=versions[-1],
                    versions=len(versions),
                    method=latest.method,
                    aliases=self.backend.read_aliases(name),
                    visibility=latest.visibility,
                    created_at=latest.created_at,
                )
            )
        return out

    def versions(self, name: str | AdapterRef) -> list[Manifest]:
        ref = _as_name(name)
        versions = self.backend.list_versions(ref.full_name)
        if not versions:
            raise AdapterNotFound(f"adapter {ref.full_name!r} is not in registry {self.url}")
        return [self.backend.read_manifest(ref.full_name, v) for v in versions]

    def aliases(self, name: str | AdapterRef) -> dict[str, int]:
        ref = _as_name(name)
        self._version_of(ref)  # raises AdapterNotFound for unknown names
        return self.backend.read_aliases(ref.full_name)

    def alias_history(self, name: str | AdapterRef) -> list[dict[str, Any]]:
        """Every alias move and delete of ``name``, oldest first: ``{"alias", "version" (None for a delete),
        "previous" (None for a new alias), "at" (ISO 8601, UTC)}``, plus ``"record"`` where the move gave one.
        Moves made before the history existed are not in it."""
        ref = _as_name(name)
        self._version_of(ref)  # raises AdapterNotFound for unknown names
        return self.backend.read_alias_history(ref.full_name)

    # -- aliases -------------------------------------------------------------------------------
    def set_alias(
        self, name: str | AdapterRef, alias: str, version: int, record: dict[str, Any] | None = None
    ) -> Manifest:
        """Point ``alias`` at an existing ``version`` (moving it if set; rollback = move it back).

        ``record``, a JSON object, is kept with the move in the alias history (:meth:`alias_history`): why it
        moved, e.g. a gated promotion's evaluation of ``version`` against the version it replaces. Its
        ``"summary"`` string, if any, is what ``hotswap alias NAME --history`` shows."""
        ref = _as_name(name)
        check_alias(alias)
        record = check_record(record)
        manifest = self.resolve(ref.at(version))
        self.backend.write_alias(ref.full_name, alias, version, record)
        self._forget(ref.full_name)
        log.info("alias %s:%s -> %d", ref.full_name, alias, version)
        return manifest

    def delete_alias(self, name: str | AdapterRef, alias: str, record: dict[str, Any] | None = None) -> None:
        """Remove ``alias`` (:class:`AdapterNotFound` if it is not set); recorded in the alias history, with
        ``record`` if given."""
        ref = _as_name(name)
        check_alias(alias)
        record = check_record(record)
        self._version_of(ref)
        self.backend.write_alias(ref.full_name, alias, None, record)
        self._forget(ref.full_name)
