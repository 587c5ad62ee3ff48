"""hotswap.registry: immutable, versioned adapter artifacts with manifests and movable aliases.

Pure Python (no model code): refs, manifests, artifact checks, backends. ``train`` and ``serve``
import it; it imports neither.
"""

from __future__ import annotations

from hotswap.registry.artifact import HOTSWAP_CONFIG, PEFT_CONFIG, check_safetensors, verify
from hotswap.registry.backend import Backend
from hotswap.registry.local import LocalBackend
from hotswap.registry.manifest import MANIFEST_FILE, FileEntry, Lineage, Manifest
from hotswap.registry.refs import LATEST, AdapterRef
from hotswap.registry.registry import (
    ENV_REGISTRY,
    AdapterSummary,
    Registry,
    default_registry_url,
    open_backend,
)

__all__ = [
    "ENV_REGISTRY",
    "HOTSWAP_CONFIG",
    "LATEST",
    "MANIFEST_FILE",
    "PEFT_CONFIG",
    "AdapterRef",
    "AdapterSummary",
    "Backend",
    "FileEntry",
    "Lineage",
    "LocalBackend",
    "Manifest",
    "Registry",
    "check_safetensors",
    "default_registry_url",
    "open_backend",
    "verify",
]
