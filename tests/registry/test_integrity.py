from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hotswap.errors import BaseModelMismatch, IntegrityError, InvalidArtifact
from hotswap.registry import Manifest, Registry

MakeArtifact = Callable[..., Path]


def _stored(registry: Registry, ref: str, rel: str = "adapter_model.safetensors") -> Path:
    _, path = registry.fetch(ref)
    f = path / rel
    os.chmod(f, 0o644)
    return f


def test_tampered_file_is_refused(registry: Registry, make_artifact: MakeArtifact) -> None:
    registry.publish(make_artifact(), "math")
    f = _stored(registry, "math")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        registry.fetch("math")


def test_fetch_read_hands_over_only_verified_reads(registry: Registry, make_artifact: MakeArtifact) -> None:
    """The reader runs while the files are hashed: its result comes back only for intact files, and for tampered
    ones IntegrityError wins over whatever the reader returned or raised."""
    registry.publish(make_artifact(), "math")
    manifest, size = registry.fetch_read("math", lambda m, path: (path / "adapter_model.safetensors").stat().st_size)
    assert manifest.ref == "math@1" and size == manifest.files["adapter_model.safetensors"].size
    f = _stored(registry, "math")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        registry.fetch_read("math", lambda m, path: "parsed anyway")

    def fails(m: Manifest, path: Path) -> None:
        raise ValueError("garbled by the tampering")

    with pytest.raises(IntegrityError, match="sha256") as caught:
        registry.fetch_read("math", fails)
    assert isinstance(caught.value.__context__, ValueError)


def test_truncated_file_is_refused(registry: Registry, make_artifact: MakeArtifact) -> None:
    registry.publish(make_artifact(), "math")
    f = _stored(registry, "math")
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(IntegrityError, match="truncated"):
        registry.fetch("math")


def test_missing_and_extra_files_are_refused(registry: Registry, make_artifact: MakeArtifact) -> None:
    registry.publish(make_artifact(), "a")
    registry.publish(make_artifact(), "b")
    _stored(registry, "a").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        registry.fetch("a")
    _, path = registry.fetch("b")
    os.chmod(path, 0o755)
    (path / "extra.bin").write_bytes(b"\x80\x04evil")
    with pytest.raises(IntegrityError, match="unexpected file"):
        registry.fetch("b")


def test_pull_copies_verified_files_and_refuses_tampered(
    registry: Registry, make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    src = make_artifact()
    registry.publish(src, "math")
    m = registry.pull("math", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    assert Manifest.from_json((tmp_path / "out" / "manifest.json").read_text()) == m
    with pytest.raises(InvalidArtifact, match="already exists"):
        registry.pull("math", tmp_path / "out")
    f = _stored(registry, "math")
    f.write_bytes(b"0" * f.stat().st_size)
    with pytest.raises(IntegrityError):
        registry.pull("math", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not any(p.name.startswith(".out2") for p in tmp_path.iterdir())


def test_base_fingerprint_is_enforced(registry: Registry, make_artifact: MakeArtifact) -> None:
    registry.publish(make_artifact(), "math", base_fingerprint="hsfp1:bbb")
    registry.publish(make_artifact(), "nobase")
    assert registry.resolve("math", base_fingerprint="hsfp1:bbb").version == 1
    with pytest.raises(BaseModelMismatch, match="trained for base"):
        registry.resolve("math", base_fingerprint="hsfp1:aaa")
    with pytest.raises(BaseModelMismatch, match="trained for base"):
        registry.fetch("math@1", base_fingerprint="hsfp1:aaa")
    with pytest.raises(BaseModelMismatch, match="without a base fingerprint"):
        registry.fetch("nobase", base_fingerprint="hsfp1:aaa")


def test_garbage_manifest_is_an_integrity_error(registry: Registry, make_artifact: MakeArtifact) -> None:
    with pytest.raises(IntegrityError):
        Manifest.from_json("not json")
    with pytest.raises(IntegrityError):
        Manifest.from_json('{"name": "x"}')
    registry.publish(make_artifact(), "math")
    _, path = registry.fetch("math")
    os.chmod(path / "manifest.json", 0o644)
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(IntegrityError):
        registry.resolve("math")
