"""The embedded local-directory registry backend.

Layout under the root::

    public/<name>/versions/<N>/...        one immutable directory per version (files + manifest.json)
    public/<name>/aliases.json            {"prod": 3, ...}, replaced atomically
    public/<name>/alias_history.jsonl     one JSON line per alias move or delete, oldest first, replaced
                                          atomically (whole) just before aliases.json, under the same lock
    public/<name>/.lock                   flock serialising version allocation and alias moves
    tenants/<tenant>/<name>/...           the same for tenant-scoped adapters
    .staging/<pid>-<host>-<random>/       a publish in progress; never visible as a version

Publishing copies into a staging directory (no lock held), then, under the name's lock, picks the
version number, writes the manifest, fsyncs and renames the directory into ``versions/``. A reader
therefore sees a version completely or not at all; a publisher killed at any point leaves at most a
staging directory, removed by the next publish on the same host once its process is gone (a registry
directory shared by several hosts never loses another host's publish in progress: their pids mean
nothing here).

An alias move writes the history (with the new entry) first, then ``aliases.json``: a writer killed
between the two leaves an entry for a move that did not land (the next entry's ``previous`` shows what
the alias really pointed at), never a move without its entry. A registry written before the history
existed reads as an empty history.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from hotswap.errors import AdapterNotFound, IntegrityError, RegistryUnavailable, VersionExists
from hotswap.fsutil import atomic_write_bytes, fsync_dir, fsync_tree, locked
from hotswap.registry.backend import HISTORY_FILE, history_entry, history_line, parse_history
from hotswap.registry.manifest import MANIFEST_FILE, Manifest
from hotswap.registry.refs import AdapterRef

log = logging.getLogger(__name__)

_STAGING = ".staging"
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"  # no '-': it separates the name's parts
_ALIASES = "aliases.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalBackend:
    """Registry storage in a local directory (the embedded default)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    # -- paths ---------------------------------------------------------------------------------
    def _adapter_dir(self, name: str) -> Path:
        ref = AdapterRef.parse(name)  # re-validated: nothing reaches the filesystem unchecked
        if ref.version is not None or ref.alias is not None:
            raise ValueError(f"backend names carry no version or alias: {name!r}")
        if ref.tenant:
            return self.root / "tenants" / ref.tenant / ref.name
        return self.root / "public" / ref.name

    def _version_dir(self, name: str, version: int) -> Path:
        return self._adapter_dir(name) / "versions" / str(version)

    # -- reads ---------------------------------------------------------------------------------
    def list_names(self) -> list[str]:
        names = []
        public = self.root / "public"
        if public.is_dir():
            names += [d.name for d in public.iterdir() if (d / "versions").is_dir()]
        tenants = self.root / "tenants"
        if tenants.is_dir():
            for t in tenants.iterdir():
                names += [f"{t.name}/{d.name}" for d in t.iterdir() if (d / "versions").is_dir()]
        return sorted(n for n in names if self.list_versions(n))

    def list_versions(self, name: str) -> list[int]:
        vdir = self._adapter_dir(name) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(d.name) for d in vdir.iterdir() if d.name.isdigit())

    def read_manifest(self, name: str, version: int) -> Manifest:
        path = self._version_dir(name, version) / MANIFEST_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise AdapterNotFound(f"{name}@{version} does not exist in {self.url}") from None
        manifest = Manifest.from_json(text, origin=f"{name}@{version}/{MANIFEST_FILE}")
        if manifest.name != name or manifest.version != version:
            raise IntegrityError(f"{name}@{version}: manifest claims to be {manifest.ref}")
        return manifest

    def read_aliases(self, name: str) -> dict[str, int]:
        path = self._adapter_dir(name) / _ALIASES
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{name}: {_ALIASES} is corrupt ({e})") from e
        return {str(k): int(v) for k, v in data.items()}

    def read_alias_history(self, name: str) -> list[dict[str, Any]]:
        try:
            data = (self._adapter_dir(name) / HISTORY_FILE).read_bytes()
        except FileNotFoundError:
            return []  # no alias ever moved, or a registry from before the history
        return parse_history(data, origin=f"{name}/{HISTORY_FILE}")

    def local_path(self, name: str, version: int) -> Path:
        path = self._version_dir(name, version)
        if not path.is_dir():
            raise AdapterNotFound(f"{name}@{version} does not exist in {self.url}")
        return path

    # -- writes --------------------------------------------------------------------------------
    def _clean_stale_staging(self) -> None:
        staging = self.root / _STAGING
        if not staging.is_dir():
            return
        for d in staging.iterdir():
            pid, _, rest = d.name.partition("-")
            host = rest.rpartition("-")[0] if "-" in rest else _HOST  # <pid>-<random>: before hosts were named
            if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
                log.info("removing staging directory %s left by dead process %s", d, pid)
                shutil.rmtree(d, ignore_errors=True)

    def commit_version(self, files: dict[str, Path], manifest: Manifest, *, pinned: bool) -> Manifest:
        adapter_dir = self._adapter_dir(manifest.name)
        try:
            self._clean_stale_staging()
            stage = self.root / _STAGING / f"{os.getpid()}-{_HOST}-{uuid.uuid4().hex}"
            stage.mkdir(parents=True)
            try:
                for rel, src in files.items():
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, stage / rel)
                    os.chmod(stage / rel, 0o444)  # versions are immutable; make accidents loud
                fsync_tree(stage)
                with locked(adapter_dir / ".lock"):
                    return self._install(stage, adapter_dir, manifest, pinned=pinned)
            finally:
                shutil.rmtree(stage, ignore_errors=True)  # no-op once renamed into place
        except PermissionError as e:
            raise RegistryUnavailable(f"cannot write to registry {self.url}: {e.strerror}") from e

    def _install(self, stage: Path, adapter_dir: Path, manifest: Manifest, *, pinned: bool) -> Manifest:
        """Under the name's lock: choose the version, write the manifest, rename into place."""
        existing = self.list_versions(manifest.name)
        if pinned:
            if manifest.version in existing:
                raise VersionExists(f"{manifest.ref} is already published; versions are immutable")
        else:
            manifest = replace(manifest, version=(existing[-1] + 1) if existing else 1)
        mpath = stage / MANIFEST_FILE
        mpath.write_text(manifest.to_json())
        os.chmod(mpath, 0o444)
        fd = os.open(mpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        versions = adapter_dir / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        target = versions / str(manifest.version)
        try:
            os.rename(stage, target)
        except OSError as e:  # a non-empty target: someone bypassed the lock; never overwrite
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise VersionExists(f"{manifest.ref} is already published; versions are immutable") from e
            raise
        fsync_dir(versions)
        log.info("published %s to %s", manifest.ref, self.url)
        return manifest

    def write_alias(self, name: str, alias: str, version: int | None, record: dict[str, Any] | None = None) -> None:
        adapter_dir = self._adapter_dir(name)
        try:
            with locked(adapter_dir / ".lock"):
                aliases = self.read_aliases(name)
                previous = aliases.get(alias)
                if version is None:
                    if alias not in aliases:
                        raise AdapterNotFound(f"{name} has no alias {alias!r}")
                    del aliases[alias]
                else:
                    aliases[alias] = version
                entry = history_line(history_entry(alias, version, previous, record))
                history = adapter_dir / HISTORY_FILE
                try:
                    old = history.read_bytes()
                except FileNotFoundError:
                    old = b""
                if old and not old.endswith(b"\n"):
                    old += b"\n"  # written by hand, say: the new entry still starts its own line
                atomic_write_bytes(history, old + entry)
                atomic_write_bytes(adapter_dir / _ALIASES, json.dumps(aliases, sort_keys=True).encode())
        except PermissionError as e:
            raise RegistryUnavailable(f"cannot write to registry {self.url}: {e.strerror}") from e
