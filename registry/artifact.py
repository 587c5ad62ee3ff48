"""The adapter artifact: what a publishable directory must hold, and checking a stored copy against its manifest.

An artifact is a directory with the method's config JSON and safetensors weights: PEFT's own
``adapter_config.json`` + ``adapter_model.safetensors`` where PEFT has the method, otherwise
``hotswap_config.json`` (a ``method`` field) + safetensors (docs/registry.md, "Artifact format"). Weights are
safetensors only: pickle-based files are refused by name and by content.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from hotswap.errors import IntegrityError, InvalidArtifact
from hotswap.formats import HOTSWAP_CONFIG, PEFT_CONFIG
from hotswap.fsutil import sha256_file
from hotswap.registry.manifest import MANIFEST_FILE, FileEntry, Manifest

# Extensions of formats that can execute code on load (pickle, torch.save zips, numpy object arrays).
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def check_safetensors(path: Path) -> dict[str, dict]:
    """Parse a safetensors header and check the file is complete; return the tensor table.

    Raises :class:`InvalidArtifact` for a truncated or malformed file. Reads only the header.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidArtifact(f"{path.name}: not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise InvalidArtifact(f"{path.name}: safetensors header claims {n} bytes; the file is truncated")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidArtifact(f"{path.name}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise InvalidArtifact(f"{path.name}: safetensors header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for key, info in tensors.items():
        try:
            _start, stop = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArtifact(f"{path.name}: tensor {key!r} has no valid data_offsets") from e
        end = max(end, stop)
    if 8 + n + end != size:
        raise InvalidArtifact(
            f"{path.name}: holds {size - 8 - n} data bytes but its header describes {end}: truncated or padded"
        )
    return tensors


def _refuse_pickle(rel: str, path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidArtifact(
            f"{rel}: pickle-based weight files are refused (they can run code on load); save safetensors"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(_PICKLE_MAGIC) or magic == _ZIP_MAGIC:
        raise InvalidArtifact(f"{rel}: content is a pickle or torch.save archive; only safetensors is accepted")


def scan_artifact(src: Path) -> dict[str, Path]:
    """Validate a directory to publish and return its files (relative posix path -> absolute path).

    A ``manifest.json`` already in ``src`` (e.g. a pulled copy) is skipped: the registry writes its own.
    """
    if not src.is_dir():
        raise InvalidArtifact(f"{src}: not a directory")
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(src).as_posix()
            if name.startswith(".") or rel == MANIFEST_FILE:
                continue
            if path.is_symlink() or not path.is_file():
                raise InvalidArtifact(f"{rel}: symlinks and special files are not allowed in an artifact")
            _refuse_pickle(rel, path)
            if path.suffix == ".safetensors":
                check_safetensors(path)
            files[rel] = path
    if not any(rel.endswith(".safetensors") for rel in files):
        raise InvalidArtifact(f"{src}: no .safetensors weights found")
    if PEFT_CONFIG not in files and HOTSWAP_CONFIG not in files:
        raise InvalidArtifact(f"{src}: neither {PEFT_CONFIG} (PEFT) nor {HOTSWAP_CONFIG} (hotswap) found")
    return files


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArtifact(f"{path.name}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InvalidArtifact(f"{path.name}: expected a JSON object")
    return data


def detect_method(src: Path) -> str:
    """The method of an artifact: from ``hotswap_config.json``'s ``method``, or the registered method whose PEFT type
    (and flag) ``adapter_config.json`` names."""
    if (src / HOTSWAP_CONFIG).is_file():
        method = _load_json(src / HOTSWAP_CONFIG).get("method")
        if not isinstance(method, str) or not method:
            raise InvalidArtifact(f"{HOTSWAP_CONFIG}: missing a 'method' string")
        return method
    config = _load_json(src / PEFT_CONFIG)
    # The method definitions pull in torch and PEFT, which listing or fetching never needs: imported on first use.
    from hotswap.methods import peft_method

    method = peft_method(config)
    if method is None:
        raise InvalidArtifact(f"{PEFT_CONFIG}: unsupported or missing peft_type {config.get('peft_type')!r}")
    return method


def hash_files(files: dict[str, Path]) -> dict[str, FileEntry]:
    return {rel: FileEntry(sha256=sha256_file(p), size=p.stat().st_size) for rel, p in sorted(files.items())}


def verify(root: Path, manifest: Manifest) -> None:
    """Check that ``root`` holds exactly the manifest's files with their sizes and sha256.

    Raises :class:`IntegrityError` naming the first file that is missing, extra, truncated or altered.
    """
    where = manifest.ref
    present = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST_FILE
    }
    if extra := sorted(present - manifest.files.keys()):
        raise IntegrityError(f"{where}: unexpected file {extra[0]!r} is not in the manifest")
    for rel, entry in sorted(manifest.files.items()):
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise IntegrityError(f"{where}: file {rel!r} is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{where}: file {rel!r} is {size} bytes, manifest says {entry.size} (truncated?)")
        if sha256_file(path) != entry.sha256:
            raise IntegrityError(f"{where}: file {rel!r} does not match its sha256 (corrupted or tampered)")
