from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hotswap.errors import InvalidAdapterRef, InvalidArtifact, VersionExists
from hotswap.registry import Lineage, Registry

MakeArtifact = Callable[..., Path]


def test_versions_are_numbered_and_manifest_is_complete(registry: Registry, make_artifact: MakeArtifact) -> None:
    src = make_artifact()
    m1 = registry.publish(
        src, "math", base_fingerprint="hsfp1:abc", lineage=Lineage(parent=None, data_digest="d"), metrics={"loss": 0.5}
    )
    m2 = registry.publish(make_artifact(seed=1), "math")
    assert (m1.version, m2.version) == (1, 2)
    assert m1.method == "lora" and m1.name == "math" and m1.visibility == "public" and m1.tenant is None
    assert m1.base_fingerprint == "hsfp1:abc" and m1.metrics == {"loss": 0.5} and m1.lineage.data_digest == "d"
    for rel, entry in m1.files.items():
        data = (src / rel).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    assert set(m1.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert registry.resolve("math@1") == m1


def test_methods_are_detected(registry: Registry, make_artifact: MakeArtifact) -> None:
    assert registry.publish(make_artifact(use_dora=True), "d").method == "dora"
    assert registry.publish(make_artifact(peft_type="PREFIX_TUNING"), "p").method == "prefix"
    assert registry.publish(make_artifact(method="bitfit"), "b").method == "bitfit"
    assert registry.publish(make_artifact(), "o", method="plora").method == "plora"


def test_tenant_visibility(registry: Registry, make_artifact: MakeArtifact) -> None:
    m = registry.publish(make_artifact(), "acme/tone")
    assert (m.tenant, m.visibility) == ("acme", "private")
    assert registry.publish(make_artifact(), "acme/open", visibility="public").visibility == "public"
    with pytest.raises(InvalidArtifact, match="tenant-scoped"):
        registry.publish(make_artifact(), "plain", visibility="private")
    assert registry.names() == ["acme/open", "acme/tone"]


def test_published_version_is_independent_of_its_source(registry: Registry, make_artifact: MakeArtifact) -> None:
    src = make_artifact()
    registry.publish(src, "math")
    shutil.rmtree(src)
    manifest, path = registry.fetch("math")
    assert manifest.version == 1 and (path / "adapter_model.safetensors").is_file()


def test_stored_files_are_read_only(registry: Registry, make_artifact: MakeArtifact) -> None:
    registry.publish(make_artifact(), "math")
    _, path = registry.fetch("math@1")
    for f in path.iterdir():
        assert not os.stat(f).st_mode & 0o222


def test_pinned_version_cannot_be_republished(registry: Registry, make_artifact: MakeArtifact) -> None:
    registry.publish(make_artifact(), "math", version=5)
    with pytest.raises(VersionExists):
        registry.publish(make_artifact(seed=2), "math", version=5)
    assert registry.publish(make_artifact(), "math").version == 6
    assert [m.version for m in registry.versions("math")] == [5, 6]


@pytest.mark.parametrize("bad_name", ["weights.bin", "model.pt", "state.pkl", "x.ckpt", "a.npz"])
def test_pickle_files_are_refused_by_name(registry: Registry, make_artifact: MakeArtifact, bad_name: str) -> None:
    src = make_artifact()
    (src / bad_name).write_bytes(b"whatever")
    with pytest.raises(InvalidArtifact, match="pickle"):
        registry.publish(src, "math")
    assert registry.names() == []


@pytest.mark.parametrize("content", [pickle.dumps({"w": [1, 2]}, protocol=4), b"PK\x03\x04rest-of-a-zip"])
def test_pickle_content_is_refused_whatever_the_name(
    registry: Registry, make_artifact: MakeArtifact, content: bytes
) -> None:
    src = make_artifact()
    (src / "weights.dat").write_bytes(content)
    with pytest.raises(InvalidArtifact, match="pickle"):
        registry.publish(src, "math")
    assert registry.names() == []


def test_truncated_safetensors_is_refused_at_publish(registry: Registry, make_artifact: MakeArtifact) -> None:
    src = make_artifact()
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InvalidArtifact, match="truncated"):
        registry.publish(src, "math")
    assert registry.names() == []


def test_incomplete_artifacts_are_refused(registry: Registry, make_artifact: MakeArtifact, tmp_path: Path) -> None:
    no_weights = make_artifact()
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidArtifact, match="safetensors"):
        registry.publish(no_weights, "a")
    no_config = make_artifact()
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(InvalidArtifact, match=r"adapter_config\.json"):
        registry.publish(no_config, "a")
    with_link = make_artifact()
    (with_link / "link.json").symlink_to("/etc/hostname")
    with pytest.raises(InvalidArtifact, match="symlink"):
        registry.publish(with_link, "a")
    with pytest.raises(InvalidArtifact, match="not a directory"):
        registry.publish(tmp_path / "missing", "a")
    with pytest.raises(InvalidAdapterRef):
        registry.publish(make_artifact(), "../escape")
    assert registry.names() == []


def test_existing_manifest_in_source_is_replaced(registry: Registry, make_artifact: MakeArtifact) -> None:
    src = make_artifact()
    (src / "manifest.json").write_text('{"name": "forged", "version": 99}')
    m = registry.publish(src, "math")
    assert m.version == 1 and "manifest.json" not in m.files
