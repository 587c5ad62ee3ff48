"""The manifest the registry writes beside every published version (``manifest.json``).

It is the registry's record of what a version *is*: which files (sha256 + size), which method, which
base model it was trained for, where it came from (lineage) and how good it was (metrics). Once a
version is published its manifest never changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from hotswap.errors import IntegrityError

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
VISIBILITIES = ("public", "private")


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # hex digest of the file's bytes
    size: int  # bytes


@dataclass(frozen=True)
class Lineage:
    """Where a version came from. Every field is optional: a hand-made adapter has no training config."""

    parent: str | None = None  # e.g. "math@2" when fine-tuned further from that version
    training_config: dict[str, Any] | None = None  # the full config of the run that produced it
    data_digest: str | None = None  # sha256 of the training data as consumed
    code_version: str | None = None  # hotswap version (and git commit if known) that produced it


@dataclass(frozen=True)
class Manifest:
    name: str  # full name, "tenant/name" or "name"
    version: int
    method: str  # "lora", "dora", "prefix", "bitfit", ...
    files: dict[str, FileEntry]  # posix path relative to the version dir -> digest
    created_at: str  # ISO 8601, UTC
    base_fingerprint: str | None = None  # hotswap.basemodel.fingerprint() of the base it was trained for
    lineage: Lineage = field(default_factory=Lineage)
    metrics: dict[str, Any] = field(default_factory=dict)
    visibility: str = "public"  # "public" (anyone may use) or "private" (its tenant only)
    tenant: str | None = None
    description: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            schema = data.get("schema", SCHEMA_VERSION)
            if schema != SCHEMA_VERSION:
                raise IntegrityError(f"manifest schema {schema} is not supported (expected {SCHEMA_VERSION})")
            return cls(
                name=data["name"],
                version=int(data["version"]),
                method=data["method"],
                files={p: FileEntry(**e) for p, e in data["files"].items()},
                created_at=data["created_at"],
                base_fingerprint=data.get("base_fingerprint"),
                lineage=Lineage(**(data.get("lineage") or {})),
                metrics=dict(data.get("metrics") or {}),
                visibility=data.get("visibility", "public"),
                tenant=data.get("tenant"),
                description=data.get("description", ""),
                schema=schema,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IntegrityError(f"manifest is malformed: {e!r}") from e

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{origin} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise IntegrityError(f"{origin} is not a JSON object")
        return cls.from_dict(data)
