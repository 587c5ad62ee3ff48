"""The alias history: every move and delete recorded with the alias, oldest first, on both backends."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hotswap.errors import AdapterNotFound, IntegrityError, InvalidArgument, RegistryUnavailable
from hotswap.registry import Registry
from hotswap.registry.backend import HISTORY_FILE
from hotswap.registry.hub import HubBackend
from hotswap.registry.local import LocalBackend
from tests.hubserver import HubServer
from tests.registry.conftest import MakeArtifact, publish_three

EVAL = {
    "summary": "v3 beats v1 on math-eval: 0.71 > 0.64",
    "metric": "accuracy",
    "candidate": {"ref": "math@3", "score": 0.71},
    "incumbent": {"ref": "math@1", "score": 0.64},
    "passed": True,
    "examples": 500,
    "notes": ["seed 0", "greedy"],
}


@pytest.fixture
def three_versions(any_registry: Registry, make_artifact: MakeArtifact) -> Registry:
    return publish_three(any_registry, make_artifact)


def moves(history: list[dict]) -> list[tuple[str, int | None, int | None]]:
    return [(e["alias"], e["previous"], e["version"]) for e in history]


def forget_history(reg: Registry, name: str) -> None:
    """Make ``name`` look like a registry written before the alias history existed."""
    if isinstance(reg.backend, LocalBackend):
        (reg.backend._adapter_dir(name) / HISTORY_FILE).unlink()
    else:
        assert isinstance(reg.backend, HubBackend)
        reg.backend.api.delete_file(HISTORY_FILE, reg.backend.repo_id(name))


def test_every_move_and_delete_is_recorded_oldest_first(three_versions: Registry) -> None:
    reg = three_versions
    reg.set_alias("math", "prod", 3)
    reg.set_alias("math", "prod", 1)  # rollback
    reg.delete_alias("math", "staging")
    reg.set_alias("math", "staging", 3)
    history = reg.alias_history("math")
    assert moves(history) == [
        ("prod", None, 1),  # published with --alias: new aliases have no previous
        ("staging", None, 2),
        ("prod", 1, 3),
        ("prod", 3, 1),
        ("staging", 2, None),  # a delete: version null
        ("staging", None, 3),
    ]
    stamps = [datetime.fromisoformat(e["at"]) for e in history]
    assert all(s.utcoffset() == timedelta(0) for s in stamps)  # UTC
    assert stamps == sorted(stamps) and datetime.now(UTC) - timedelta(minutes=1) < stamps[0] <= datetime.now(UTC)
    assert all("record" not in e for e in history)  # none given: no key
    assert Registry(reg.url).alias_history("math") == history  # stored, not kept in memory


def test_record_round_trips_and_manifests_stay_untouched(three_versions: Registry) -> None:
    reg = three_versions
    manifests = [m.to_json() for m in reg.versions("math")]
    reg.set_alias("math", "prod", 3, record=EVAL)
    reg.set_alias("math", "canary", 2, record={"pair": (1, 2), "nested": {"ok": None, "ü": "ß"}})
    reg.delete_alias("math", "canary", record={"summary": "canary done"})
    *_, promoted, canary, deleted = reg.alias_history("math")
    assert promoted == {"alias": "prod", "version": 3, "previous": 1, "at": promoted["at"], "record": EVAL}
    assert canary["record"] == {"pair": [1, 2], "nested": {"ok": None, "ü": "ß"}}  # as JSON reads it back
    assert (deleted["version"], deleted["previous"], deleted["record"]) == (None, 2, {"summary": "canary done"})
    assert [m.to_json() for m in reg.versions("math")] == manifests  # published versions are immutable
    assert reg.resolve("math:prod").version == 3


@pytest.mark.parametrize(
    ("record", "needle"),
    [("v3 is better", "JSON object"), ({"score": math.nan}, "JSON-serialisable"), ({"when": object()}, "serialis")],
)
def test_bad_records_are_refused_and_nothing_moves(three_versions: Registry, record: object, needle: str) -> None:
    reg = three_versions
    history = reg.alias_history("math")
    with pytest.raises(InvalidArgument, match=needle):
        reg.set_alias("math", "prod", 3, record=record)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=needle):
        reg.delete_alias("math", "prod", record=record)  # type: ignore[arg-type]
    assert reg.aliases("math") == {"prod": 1, "staging": 2}
    assert reg.alias_history("math") == history


def test_failed_moves_record_nothing(three_versions: Registry) -> None:
    reg = three_versions
    history = reg.alias_history("math")
    with pytest.raises(AdapterNotFound, match="no version 9"):
        reg.set_alias("math", "prod", 9, record=EVAL)
    with pytest.raises(AdapterNotFound, match="no alias"):
        reg.delete_alias("math", "canary")
    assert reg.alias_history("math") == history
    with pytest.raises(AdapterNotFound, match="ghost"):
        reg.alias_history("ghost")


def test_a_registry_from_before_the_history_reads_as_empty(
    three_versions: Registry, make_artifact: MakeArtifact
) -> None:
    reg = three_versions
    forget_history(reg, "math")
    assert reg.alias_history("math") == []
    assert reg.aliases("math") == {"prod": 1, "staging": 2}  # aliases unaffected
    reg.set_alias("math", "prod", 2, record={"summary": "first recorded"})
    (entry,) = reg.alias_history("math")
    assert (entry["alias"], entry["previous"], entry["version"]) == ("prod", 1, 2)  # previous from the aliases
    reg.publish(make_artifact(seed=3), "fresh")
    assert reg.alias_history("fresh") == []  # published without aliases: nothing moved yet


def test_publishing_keeps_the_history(three_versions: Registry, make_artifact: MakeArtifact) -> None:
    """On the Hub, a new version's commit deletes the previous version's files from main: never the history."""
    reg = three_versions
    reg.set_alias("math", "prod", 2, record=EVAL)
    history = reg.alias_history("math")
    reg.publish(make_artifact(method="bitfit"), "math")  # other file names than v1-v3
    assert reg.alias_history("math") == history
    assert reg.aliases("math") == {"prod": 2, "staging": 2}


def test_concurrent_movers_leave_one_consistent_history(three_versions: Registry) -> None:
    """Two writers moving the same alias at once: every move recorded exactly once, each entry's previous is
    the version the one before it set, and the last entry is where the alias points."""
    reg = three_versions
    n = 12 if isinstance(reg.backend, LocalBackend) else 5
    start = len(reg.alias_history("math"))
    errors: list[BaseException] = []

    def mover(versions: tuple[int, int]) -> None:
        mine = Registry(reg.url)  # its own client, as another process would have
        try:
            for i in range(n):
                mine.set_alias("math", "prod", versions[i % 2], record={"writer": versions, "i": i})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=mover, args=(vs,)) for vs in ((1, 2), (3, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    history = reg.alias_history("math")[start:]
    assert len(history) == 2 * n
    for writer in ((1, 2), (3, 2)):  # each writer's moves, in its own order
        assert [e["record"]["i"] for e in history if e["record"]["writer"] == list(writer)] == list(range(n))
    pointing = 1  # prod before the race
    for e in history:
        assert e["previous"] == pointing
        pointing = e["version"]
    assert reg.aliases("math")["prod"] == pointing


def test_corrupt_history_is_an_integrity_error(registry: Registry, make_artifact: MakeArtifact) -> None:
    registry.publish(make_artifact(), "math", aliases=["prod"])
    path = registry.backend._adapter_dir("math") / HISTORY_FILE  # type: ignore[attr-defined]
    path.write_bytes(path.read_bytes() + b'{"alias": "prod", "vers')
    with pytest.raises(IntegrityError, match=f"{HISTORY_FILE}: line 2"):
        registry.alias_history("math")


def test_local_history_is_replaced_atomically(registry: Registry, make_artifact: MakeArtifact) -> None:
    """Written whole through a temp file: a move leaves no temp files beside it."""
    registry.publish(make_artifact(), "math", aliases=["prod"])
    registry.publish(make_artifact(seed=1), "math")
    registry.set_alias("math", "prod", 2)
    adapter_dir = registry.backend._adapter_dir("math")  # type: ignore[attr-defined]
    assert sorted(p.name for p in adapter_dir.iterdir()) == [".lock", "alias_history.jsonl", "aliases.json", "versions"]
    assert len((adapter_dir / HISTORY_FILE).read_text().splitlines()) == 2


def test_hub_moves_alias_and_history_in_one_commit(hub: HubServer, make_artifact: MakeArtifact) -> None:
    reg = Registry("hf://team")
    reg.publish(make_artifact(), "math")
    reg.publish(make_artifact(seed=1), "math")
    repo = hub.repos["team/math"]
    commits = len(repo.commits)
    reg.set_alias("math", "prod", 2, record=EVAL)
    assert len(repo.commits) == commits + 1
    head = repo.commits[repo.branches["main"]]
    assert {"aliases.json", HISTORY_FILE} <= set(head.files)
    assert HISTORY_FILE not in repo.commits[head.parent].files  # both arrived in this one commit
    hub.fail("POST", r"/commit/", "500", times=100)
    with pytest.raises(RegistryUnavailable):
        reg.set_alias("math", "prod", 1, record=EVAL)
    hub.faults.clear()
    assert reg.aliases("math") == {"prod": 2}  # neither moved nor recorded
    assert moves(reg.alias_history("math")) == [("prod", None, 2)]


def test_mirror_does_not_copy_history_but_records_its_own_moves(
    tmp_path: Path, registry: Registry, make_artifact: MakeArtifact
) -> None:
    registry.publish(make_artifact(), "math", aliases=["prod"])
    registry.publish(make_artifact(seed=1), "math")
    registry.set_alias("math", "prod", 2, record=EVAL)
    copy = Registry(tmp_path / "copy")
    copy.mirror(registry)
    (entry,) = copy.alias_history("math")
    assert (entry["alias"], entry["previous"], entry["version"]) == ("prod", None, 2)
    assert entry["record"]["mirrored_from"] == registry.url
