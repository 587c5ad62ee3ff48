"""The small protocol every registry storage backend implements (local directory, Hugging Face Hub).

Backends store and list; they know nothing of refs, aliases resolution or verification, which live
once in :class:`hotswap.registry.Registry`. Names passed in are full names (``tenant/name`` or
``name``) that :mod:`hotswap.registry.refs` has already validated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from hotswap.registry.manifest import Manifest


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

    def commit_version(self, files: dict[str, Path], manifest: Manifest, *, pinned: bool) -> Manifest:
        """Publish ``files`` as a new version; atomic and immutable.

        ``manifest.version`` is a hint: unless ``pinned``, the backend allocates the next free number and
        returns the manifest actually stored. With ``pinned`` the exact version is written or
        :class:`VersionExists` is raised.
        """
        ...

    def write_alias(self, name: str, alias: str, version: int | None) -> None:
        """Point ``alias`` at ``version`` atomically (``None`` deletes it)."""
        ...

    def local_path(self, name: str, version: int) -> Path:
        """A local directory holding the version's files (downloading them first for remote backends)."""
        ...
