from __future__ import annotations

import pytest

from hotswap.errors import AdapterNotFound, InvalidAdapterRef
from hotswap.registry import Registry
from tests.registry.conftest import MakeArtifact, publish_three


@pytest.fixture
def three_versions(registry: Registry, make_artifact: MakeArtifact) -> Registry:
    return publish_three(registry, make_artifact)


def test_latest_and_bare_name_resolve_to_newest(three_versions: Registry) -> None:
    assert three_versions.resolve("math").version == 3
    assert three_versions.resolve("math:latest").version == 3
    assert three_versions.resolve("math@2").version == 2


def test_alias_move_and_rollback(three_versions: Registry) -> None:
    reg = three_versions
    assert reg.resolve("math:prod").version == 1
    reg.set_alias("math", "prod", 3)
    assert reg.resolve("math:prod").version == 3
    reg.set_alias("math", "prod", 1)  # rollback
    assert reg.resolve("math:prod").version == 1
    assert reg.aliases("math") == {"prod": 1, "staging": 2}
    reg.delete_alias("math", "staging")
    with pytest.raises(AdapterNotFound, match="staging"):
        reg.resolve("math:staging")


def test_alias_errors(three_versions: Registry) -> None:
    reg = three_versions
    with pytest.raises(AdapterNotFound, match="no version 9"):
        reg.set_alias("math", "prod", 9)
    assert reg.resolve("math:prod").version == 1
    for bad in ("latest", "7"):
        with pytest.raises(InvalidAdapterRef):
            reg.set_alias("math", bad, 1)
    with pytest.raises(AdapterNotFound, match="nope"):
        reg.set_alias("nope", "prod", 1)
    with pytest.raises(AdapterNotFound, match="no alias"):
        reg.delete_alias("math", "canary")
    with pytest.raises(InvalidAdapterRef):
        reg.set_alias("math@2", "prod", 1)


def test_unknown_name_version_alias(three_versions: Registry) -> None:
    for ref, needle in [("ghost", "ghost"), ("math@4", "no version 4"), ("math:canary", "no alias 'canary'")]:
        with pytest.raises(AdapterNotFound, match=needle):
            three_versions.resolve(ref)


def test_list_summarises(three_versions: Registry) -> None:
    (summary,) = three_versions.list()
    assert (summary.name, summary.latest, summary.versions, summary.method) == ("math", 3, 3, "lora")
    assert summary.aliases == {"prod": 1, "staging": 2}


def test_local_registry_sees_another_instances_alias_move_at_once(three_versions: Registry) -> None:
    """The local backend resolves afresh (no cache): an alias moved through another Registry shows at once."""
    reader = Registry(three_versions.url)
    assert reader.resolve("math:prod").version == 1
    Registry(three_versions.url).set_alias("math", "prod", 3)
    assert reader.resolve("math:prod").version == 3
