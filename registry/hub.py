"""The Hugging Face Hub registry backend (``hf://ORG``), through the real ``huggingface_hub`` client.

Layout on the Hub: one model repo per adapter, ``ORG/NAME`` (a tenant adapter ``acme/tone`` is
``ORG/T4_acme_tone``, see :meth:`HubBackend.repo_id`), private when the adapter is private. Each
version is one commit on ``main`` holding exactly that version's files and ``manifest.json`` (files
of the previous version that the new one lacks are deleted in the same commit), tagged ``v<N>``.
Aliases live in ``aliases.json`` on ``main``; moving one is a single commit, which also rewrites
``alias_history.jsonl`` on ``main`` with the move appended (the alias history, see
:mod:`hotswap.registry.backend`), so a move and its entry land together or not at all. Both files
belong to no version: a publish never deletes them.

Version numbers: the next version is one above both the highest ``v<N>`` tag and the version in the
manifest at the head of ``main``, and the commit names that head as its parent, so two publishers
racing for the same number cannot both commit (the Hub answers 412 to the loser, which re-reads and
takes the next number). A publisher that dies between commit and tag leaves an untagged commit: not a
version, and its number is never reused.

Downloads go into a verified cache (``$HOTSWAP_HUB_CACHE`` or ``~/.cache/hotswap/hub``): a version's
files are fetched at its tag into a staging directory, checked against the manifest's sha256 and
sizes, and renamed into place, so a partial or corrupt download never becomes visible. Cached
versions are served without the network (``HF_HUB_OFFLINE=1``, or the Hub unreachable).

Transient failures (connection errors, 5xx, 429) are retried with exponential backoff; 401/403 and
404 are not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hotswap.errors import (
    AdapterNotFound,
    IntegrityError,
    PermissionDenied,
    RegistryUnavailable,
    VersionExists,
)
from hotswap.fsutil import fsync_tree
from hotswap.registry.artifact import verify
from hotswap.registry.backend import HISTORY_FILE, history_entry, history_line, parse_history
from hotswap.registry.manifest import MANIFEST_FILE, Manifest
from hotswap.registry.refs import AdapterRef

log = logging.getLogger(__name__)

SCHEME = "hf://"
_ALIASES = "aliases.json"
_KEEP = (".gitattributes", _ALIASES, HISTORY_FILE)  # files on main that belong to no version
_RETRIES = 4
T = TypeVar("T")


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


class HubBackend:
    def __init__(self, url: str, token: str | None = None, cache: str | os.PathLike[str] | None = None) -> None:
        org = url.removeprefix(SCHEME).strip("/")
        if not org or "/" in org:
            raise RegistryUnavailable(f"registry URL {url!r}: expected hf://ORG")
        self.org, self.url = org, f"{SCHEME}{org}"
        self.token = token or os.environ.get("HF_TOKEN")
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.api = HfApi(endpoint=self.endpoint, token=self.token)
        default_cache = Path(os.environ.get("HOTSWAP_HUB_CACHE", Path.home() / ".cache" / "hotswap" / "hub"))
        self.cache = Path(cache or default_cache).expanduser().resolve() / org

    # -- names and errors ------------------------------------------------------------------------------
    def repo_id(self, name: str) -> str:
        """``name`` -> ``ORG/name``, or for a tenant adapter ``ORG/T<len>_<tenant>_<name>``: the Hub forbids
        "--" and "/" in repo names, and our names are lowercase, so the uppercase ``T`` prefix with the
        tenant's length can never collide with a public name and decodes unambiguously."""
        ref = AdapterRef.parse(name)
        if ref.tenant:
            return f"{self.org}/T{len(ref.tenant)}_{ref.tenant}_{ref.name}"
        return f"{self.org}/{ref.name}"

    def _name(self, repo_id: str) -> str:
        repo = repo_id.split("/", 1)[1]
        m = re.fullmatch(r"T(\d+)_(.*)", repo)
        if m is None:
            return repo
        n, rest = int(m.group(1)), m.group(2)
        return f"{rest[:n]}/{rest[n + 1 :]}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one Hub call: retry transient failures, turn the rest into our errors (naming ``what``)."""
        for attempt in range(_RETRIES):
            try:
                return fn()
            except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
                raise
            except OfflineModeIsEnabled as e:
                raise RegistryUnavailable(f"{what}: the Hub is offline (HF_HUB_OFFLINE) and it is not cached") from e
            except (HfHubHTTPError, httpx2.TransportError, OSError) as e:
                status = _status(e)
                if status in (401, 403):
                    raise PermissionDenied(f"{what}: the Hub refused the token ({status}); check HF_TOKEN") from e
                transient = status is None or status >= 500 or status == 429
                if not transient or attempt == _RETRIES - 1:
                    if status is not None and not transient:
                        raise
                    raise RegistryUnavailable(f"{what}: the Hub at {self.endpoint or 'huggingface.co'} failed: "
                                              f"{status or type(e).__name__}") from e  # fmt: skip
                delay = 0.2 * 2**attempt
                log.warning("%s: %s; retrying in %.1f s", what, status or type(e).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- reads -------------------------------------------------------------------------------------------
    def list_names(self) -> list[str]:
        try:
            repos = self._call(f"list {self.url}", lambda: list(self.api.list_models(author=self.org)))
        except RegistryUnavailable:
            if not self.cache.is_dir():
                raise
            return sorted(self._name(f"{self.org}/{d.name}") for d in self.cache.iterdir() if d.is_dir())
        return sorted(self._name(r.id) for r in repos if self.list_versions(self._name(r.id)))

    def _tags(self, name: str) -> dict[int, str]:
        repo = self.repo_id(name)
        refs = self._call(f"refs of {repo}", lambda: self.api.list_repo_refs(repo))
        return {int(t.name[1:]): t.target_commit for t in refs.tags if t.name[:1] == "v" and t.name[1:].isdigit()}

    def list_versions(self, name: str) -> list[int]:
        try:
            return sorted(self._tags(name))
        except RepositoryNotFoundError:
            return []
        except RegistryUnavailable:
            cached = self.cache / self.repo_id(name).split("/", 1)[1]
            if not cached.is_dir():
                raise
            return sorted(int(d.name[1:]) for d in cached.iterdir() if d.name[1:].isdigit())

    def _download(self, repo: str, filename: str, revision: str, dest: Path | None = None) -> Path:
        what = f"{repo}@{revision}/{filename}"
        try:
            path = self._call(
                what,
                partial(
                    hf_hub_download,
                    repo,
                    filename,
                    revision=revision,
                    token=self.token,
                    endpoint=self.endpoint,
                    cache_dir=self.cache / ".hf",
                ),
            )
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
            raise AdapterNotFound(f"{what} does not exist on the Hub ({type(e).__name__})") from None
        return Path(path)

    def read_manifest(self, name: str, version: int) -> Manifest:
        cached = self._version_dir(name, version) / MANIFEST_FILE
        if cached.is_file():
            text = cached.read_bytes()
        else:
            text = self._download(self.repo_id(name), MANIFEST_FILE, f"v{version}").read_bytes()
        manifest = Manifest.from_json(text, origin=f"{self.repo_id(name)}@v{version}/{MANIFEST_FILE}")
        if manifest.name != name or manifest.version != version:
            raise IntegrityError(f"{name}@{version}: manifest claims to be {manifest.ref}")
        return manifest

    def read_aliases(self, name: str, revision: str = "main") -> dict[str, int]:
        try:
            path = self._download(self.repo_id(name), _ALIASES, revision)
        except AdapterNotFound:
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(path.read_bytes()).items()}
        except (json.JSONDecodeError, AttributeError, ValueError) as e:
            raise IntegrityError(f"{self.repo_id(name)}: {_ALIASES} is corrupt ({e})") from e

    def _read_history_bytes(self, name: str, revision: str) -> bytes:
        try:
            return self._download(self.repo_id(name), HISTORY_FILE, revision).read_bytes()
        except AdapterNotFound:
            return b""  # no alias ever moved, or a repo from before the history

    def read_alias_history(self, name: str, revision: str = "main") -> list[dict[str, Any]]:
        data = self._read_history_bytes(name, revision)
        return parse_history(data, origin=f"{self.repo_id(name)}/{HISTORY_FILE}")

    def _version_dir(self, name: str, version: int) -> Path:
        return self.cache / self.repo_id(name).split("/", 1)[1] / f"v{version}"

    def local_path(self, name: str, version: int) -> Path:
        """The version's files in the verified cache, downloaded at tag ``v<N>`` if not there yet."""
        final = self._version_dir(name, version)
        if final.is_dir():
            return final
        manifest = self.read_manifest(name, version)
        stage = final.parent / f".stage-{os.getpid()}-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            for rel in manifest.files:
                got = self._download(self.repo_id(name), rel, f"v{version}")
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(got, stage / rel)
            (stage / MANIFEST_FILE).write_text(manifest.to_json())
            try:
                verify(stage, manifest)
            except IntegrityError:
                shutil.rmtree(self.cache / ".hf", ignore_errors=True)  # the bad blob must not be reused
                raise
            fsync_tree(stage)
            try:
                stage.rename(final)
            except OSError:
                if not final.is_dir():  # another process won the rename with the same verified files
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return final

    # -- writes ------------------------------------------------------------------------------------------
    def _ensure_repo(self, name: str, private: bool) -> str:
        repo = self.repo_id(name)
        self._call(f"create {repo}", lambda: self.api.create_repo(repo, private=private, exist_ok=True))
        return repo

    def _head(self, repo: str) -> tuple[str, int]:
        """(commit at main, the version in its manifest.json or 0)."""
        info = self._call(f"info {repo}", lambda: self.api.model_info(repo, revision="main"))
        version = 0
        if any(s.rfilename == MANIFEST_FILE for s in info.siblings or []):
            text = self._download(repo, MANIFEST_FILE, info.sha).read_bytes()
            version = Manifest.from_json(text, origin=f"{repo}@main/{MANIFEST_FILE}").version
        return info.sha, version

    def commit_version(self, files: dict[str, Path], manifest: Manifest, *, pinned: bool) -> Manifest:
        repo = self._ensure_repo(manifest.name, private=manifest.visibility == "private")
        for _ in range(8):  # a lost race re-reads the head and takes the next number
            head, head_version = self._head(repo)
            taken = set(self._tags(manifest.name))
            if pinned:
                if manifest.version in taken or manifest.version <= head_version:
                    raise VersionExists(f"{manifest.ref} already exists on the Hub (or its number was used)")
                stored = manifest
            else:
                stored = replace(manifest, version=max([head_version, *taken]) + 1)
            info = self._call(f"info {repo}", partial(self.api.model_info, repo, revision=head))
            current = {s.rfilename for s in info.siblings or []}
            ops = [CommitOperationAdd(rel, str(src)) for rel, src in files.items()]
            ops.append(CommitOperationAdd(MANIFEST_FILE, stored.to_json().encode()))
            ops += [CommitOperationDelete(p) for p in sorted(current - set(files) - {MANIFEST_FILE, *_KEEP})]
            try:
                commit = self._call(
                    f"commit {stored.ref} to {repo}",
                    partial(
                        self.api.create_commit,
                        repo,
                        operations=ops,
                        commit_message=f"hotswap: {stored.ref}",
                        parent_commit=head,
                        revision="main",
                    ),
                )
            except HfHubHTTPError as e:
                if _status(e) in (409, 412):
                    log.info("%s: main moved while publishing; retrying", repo)
                    continue
                raise
            tag = partial(self.api.create_tag, repo, tag=f"v{stored.version}", revision=commit.oid)
            self._call(f"tag {repo} v{stored.version}", tag)
            return stored
        raise RegistryUnavailable(f"{repo}: too many concurrent publishers; retry")

    def write_alias(self, name: str, alias: str, version: int | None, record: dict[str, Any] | None = None) -> None:
        repo = self.repo_id(name)
        for _ in range(8):  # a lost race (412) re-reads both files at the new head
            head, _v = self._head(repo)
            aliases = self.read_aliases(name, revision=head)
            previous = aliases.get(alias)
            if version is None:
                if alias not in aliases:
                    raise AdapterNotFound(f"{name} has no alias {alias!r}")
                del aliases[alias]
            else:
                aliases[alias] = version
            data = (json.dumps(dict(sorted(aliases.items())), indent=2) + "\n").encode()
            history = self._read_history_bytes(name, head)
            if history and not history.endswith(b"\n"):
                history += b"\n"
            history += history_line(history_entry(alias, version, previous, record))
            try:
                self._call(
                    f"alias {alias} on {repo}",
                    partial(
                        self.api.create_commit,
                        repo,
                        operations=[CommitOperationAdd(_ALIASES, data), CommitOperationAdd(HISTORY_FILE, history)],
                        commit_message=f"hotswap: {alias} -> {version}",
                        parent_commit=head,
                        revision="main",
                    ),
                )
                return
            except HfHubHTTPError as e:
                if _status(e) in (409, 412):
                    continue
                raise
        raise RegistryUnavailable(f"{repo}: too many concurrent alias writers; retry")
