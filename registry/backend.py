"""The small protocol every registry storage backend implements (local directory, Hugging Face Hub).

Backends store and list; they know nothing of refs, aliases resolution or verification, which live
once in :class:`hotswap.registry.Registry`. Names passed in are full names (``tenant/name`` or
``name``) that :mod:`hotswap.registry.refs` has already validated.

Alias history: every alias move or delete appends one entry to the adapter's history, stored beside its
aliases as JSON Lines (:data:`HISTORY_FILE`, oldest first) and written together with them. An entry::

    {"alias": "prod", "version": 3, "previous": 2, "at": "2025-01-31T12:00:00+00:00", "record": {...}}

``version`` is null for a delete, ``previous`` null for a new alias, ``at`` the write's UTC time, and
``record`` (only when given) a JSON object saying why, e.g. a gated promotion's evaluation comparison.
Published manifests stay immutable: what a promotion decided is kept here, with the move.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from hotswap.errors import IntegrityError, InvalidArgument
from hotswap.registry.manifest import Manifest

HISTORY_FILE = "alias_history.jsonl"


class Backend(Protocol):
    url: str

    def list_names(self) -> list[str]:
        """Every adapter name with at least one published version, sorted."""
        ...

    def list_versions(self, name: str) -> list[int]:
        """Published versions of ``name``, ascending; empty if the name is unknown."""
        ...

    def read_manifest(self, name: str, version: int) -> Manifest:
        """The manifest of one version; :class:`AdapterNotFound` if it does not exist."""
        ...

    def read_aliases(self, name: str) -> dict[str, int]:
        """Stored aliases of ``name`` (``latest`` is never stored)."""
        ...

    def read_alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move and delete of ``name``, oldest first; empty if none was recorded."""
        ...

    def commit_version(self, files: dict[str, Path], manifest: Manifest, *, pinned: bool) -> Manifest:
        """Publish ``files`` as a new version; atomic and immutable.

        ``manifest.version`` is a hint: unless ``pinned``, the backend allocates the next free number and
        returns the manifest actually stored. With ``pinned`` the exact version is written or
        :class:`VersionExists` is raised.
        """
        ...

    def write_alias(self, name: str, alias: str, version: int | None, record: dict[str, Any] | None = None) -> None:
        """Point ``alias`` at ``version`` atomically (``None`` deletes it, :class:`AdapterNotFound` if it is not
        set) and append the move, with ``record`` if given, to the alias history in the same write."""
        ...

    def local_path(self, name: str, version: int) -> Path:
        """A local directory holding the version's files (downloading them first for remote backends)."""
        ...


def check_record(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """``record`` as it will read back (a JSON round trip: tuples become lists, keys strings), or
    :class:`InvalidArgument` if it is not a JSON object of finite numbers, strings, lists, objects..."""
    if record is None:
        return None
    if not isinstance(record, dict):
        raise InvalidArgument(f"an alias record must be a JSON object (dict), got {type(record).__name__}")
    try:
        return json.loads(json.dumps(record, allow_nan=False))
    except (TypeError, ValueError) as e:  # an unserialisable value, NaN/inf, a non-string key ...
        raise InvalidArgument(f"an alias record must be JSON-serialisable: {e}") from e


def history_entry(
    alias: str, version: int | None, previous: int | None, record: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One history entry, stamped now (UTC)."""
    entry: dict[str, Any] = {
        "alias": alias,
        "version": version,
        "previous": previous,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if record is not None:
        entry["record"] = check_record(record)
    return entry


def history_line(entry: dict[str, Any]) -> bytes:
    """``entry`` as one line of :data:`HISTORY_FILE`."""
    return (json.dumps(entry, allow_nan=False) + "\n").encode()


def parse_history(data: bytes, origin: str) -> list[dict[str, Any]]:
    """The entries of a :data:`HISTORY_FILE`'s content; :class:`IntegrityError` (naming ``origin``) if corrupt."""
    entries = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{origin}: line {n} is corrupt ({e})") from e
        if not isinstance(entry, dict) or not isinstance(entry.get("alias"), str):
            raise IntegrityError(f"{origin}: line {n} is not an alias history entry")
        entries.append(entry)
    return entries
