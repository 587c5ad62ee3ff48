"""The Hub backend against a Hub-compatible HTTP server (tests/hubserver.py) through the real
``huggingface_hub`` client: no mocks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from hotswap.basemodel import fingerprint, load_model
from hotswap.errors import AdapterNotFound, IntegrityError, PermissionDenied, RegistryUnavailable, VersionExists
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import (
    RandomLoraConfig,
    random_bitfit,
    random_bottlenecks,
    random_lora,
    random_prefix,
    random_prompt,
    random_proxies,
    random_sparse,
)
from tests.hubserver import HubServer
from tests.registry.conftest import OTHER  # the fixture ``hub`` is in conftest too


@pytest.fixture(scope="module")
def artifacts(tiny_base: Path, small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hub-artifacts")
    return {
        "lora": random_lora(tiny_base, d / "lora", RandomLoraConfig(rank=4, seed=1, init_std=0.2)),
        "dora": random_lora(tiny_base, d / "dora", RandomLoraConfig(rank=4, seed=2, init_std=0.2, use_dora=True)),
        "bitfit": random_bitfit(tiny_base, d / "bitfit", seed=3, std=0.2),
        "prefix": random_prefix(tiny_base, d / "prefix", num_virtual_tokens=3, seed=4),
        "prompt": random_prompt(tiny_base, d / "prompt", num_virtual_tokens=3, seed=5),
        "lora2": random_lora(tiny_base, d / "lora2", RandomLoraConfig(rank=2, seed=6, init_std=0.2)),
        "bottleneck": random_bottlenecks(tiny_base, {d / "bottleneck": 7}, bottleneck_dim=4)[0],
        "fishmask": random_sparse(tiny_base, d / "fishmask", "fishmask", seed=8),
        "proxy": random_proxies(small_base, {d / "proxy": 9})[0],  # files in subdirectories
    }


HUB_METHODS = ("lora", "dora", "bitfit", "prefix", "prompt", "bottleneck", "fishmask", "proxy")


def test_round_trip_every_method(hub: HubServer, artifacts: dict[str, Path], tiny_base: Path, tmp_path: Path) -> None:
    reg = Registry("hf://team")
    fp = fingerprint(tiny_base)
    for method in HUB_METHODS:
        m = reg.publish(artifacts[method], f"m-{method}", base_fingerprint=fp)
        assert m.ref == f"m-{method}@1" and m.method == method
    assert reg.names() == sorted(f"m-{x}" for x in HUB_METHODS)
    # a fresh client (empty cache) pulls and verifies; PEFT loads the pulled LoRA
    fresh = Registry("hf://team")
    pulled = tmp_path / "pulled"
    fresh.pull("m-lora@1", pulled)
    original = PeftModel.from_pretrained(load_model(tiny_base), artifacts["lora"]).eval()
    loaded = PeftModel.from_pretrained(load_model(tiny_base), pulled).eval()
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)
    # the engine serves straight from the Hub registry, every method in one batch
    with Engine(tiny_base, fresh, max_batch=8, max_seq_len=32) as engine:
        reqs = [Request(prompt_ids=[5, 17, 99], adapters=[f"m-{x}"], max_new_tokens=2) for x in HUB_METHODS]
        assert all(len(r.token_ids) == 2 for r in engine.generate(reqs))


def test_versions_aliases_and_files_per_version(hub: HubServer, artifacts: dict[str, Path]) -> None:
    reg = Registry("hf://team")
    reg.publish(artifacts["lora"], "math", aliases=["prod"])
    reg.publish(artifacts["bitfit"], "math")  # a different method: v1's files must not leak into v2
    assert [m.version for m in reg.versions("math")] == [1, 2]
    assert reg.resolve("math").version == 2 and reg.resolve("math:prod").version == 1
    reg.set_alias("math", "prod", 2)
    assert reg.aliases("math") == {"prod": 2}
    reg.set_alias("math", "prod", 1)  # rollback
    assert Registry("hf://team").resolve("math:prod").version == 1
    v1 = set(reg.resolve("math@1").files)
    v2_dir = reg.fetch("math@2")[1]
    assert {p.name for p in v2_dir.iterdir()} == {"hotswap_config.json", "adapter_model.safetensors", "manifest.json"}
    assert "adapter_config.json" in v1
    refs = {t for t in hub.repos["team/math"].tags}
    assert refs == {"v1", "v2"}
    with pytest.raises(AdapterNotFound):
        reg.resolve("math@3")
    with pytest.raises(VersionExists):
        reg.publish(artifacts["lora"], "math", version=2)


def test_concurrent_publishers_get_distinct_versions(hub: HubServer, artifacts: dict[str, Path]) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def publish(key: str) -> None:
        try:
            results.append(Registry("hf://team").publish(artifacts[key], "race").version)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(k,)) for k in ("lora", "lora2", "bitfit", "dora")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == [1, 2, 3, 4]
    reg = Registry("hf://team")
    for v in results:
        reg.fetch(f"race@{v}")  # every version verifies: its files are its own


def test_private_tenant_repos_need_a_token(
    hub: HubServer, artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry("hf://team").publish(artifacts["lora"], "acme/tone")  # tenant name: private repo
    assert hub.repos["team/T4_acme_tone"].private
    assert Registry("hf://team").resolve("acme/tone").ref == "acme/tone@1"
    monkeypatch.delenv("HF_TOKEN")
    anonymous = Registry("hf://team")
    assert anonymous.names() == []
    with pytest.raises(AdapterNotFound):
        anonymous.resolve("acme/tone")
    monkeypatch.setenv("HF_TOKEN", OTHER)
    with pytest.raises(PermissionDenied, match="refused the token"):
        Registry("hf://team").publish(artifacts["lora"], "intruder")


def test_transient_failures_are_retried(hub: HubServer, artifacts: dict[str, Path]) -> None:
    reg = Registry("hf://team")
    hub.fail("POST", r"/commit/", "500", times=2)
    assert reg.publish(artifacts["lora"], "flaky").version == 1
    hub.fail("GET", r"/resolve/v1/adapter_model", "drop", times=1)
    assert reg.fetch("flaky@1")[0].version == 1  # a dropped connection mid-download is retried
    hub.fail("GET", r"/refs$", "429", times=2)  # rate limited: backoff and retry
    assert reg.resolve("flaky").version == 1


def test_unreachable_hub_is_a_clean_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HOTSWAP_HUB_CACHE", str(tmp_path))
    with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port}"):
        Registry("hf://team").resolve("anything")


def test_corrupt_download_is_refused_and_not_cached(hub: HubServer, artifacts: dict[str, Path]) -> None:
    Registry("hf://team").publish(artifacts["lora"], "bad")
    hub.fail("GET", r"/resolve/v1/adapter_model", "corrupt", times=1)
    reg = Registry("hf://team")
    with pytest.raises(IntegrityError):
        reg.fetch("bad@1")
    assert reg.fetch("bad@1")[0].version == 1  # nothing bad was cached: the next fetch downloads again


def test_outage_is_a_clean_error_and_the_cache_still_serves(
    hub: HubServer, artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry("hf://team")
    reg.publish(artifacts["lora"], "cached")
    reg.fetch("cached@1")
    hub.fail("GET", r".", "500", times=1000)
    hub.fail("HEAD", r".", "500", times=1000)
    with pytest.raises(RegistryUnavailable, match="500"):
        reg.resolve("never-cached")
    manifest, path = Registry("hf://team").fetch("cached@1")  # versions pinned by number: from the cache
    assert manifest.version == 1 and (path / "adapter_model.safetensors").is_file()


def test_failed_commit_publishes_nothing(hub: HubServer, artifacts: dict[str, Path]) -> None:
    reg = Registry("hf://team")
    reg.publish(artifacts["lora"], "steady")
    hub.fail("POST", r"/commit/", "500", times=100)
    with pytest.raises(RegistryUnavailable, match="commit steady@2"):
        reg.publish(artifacts["bitfit"], "steady")
    hub.faults.clear()
    assert [m.version for m in reg.versions("steady")] == [1]
    assert reg.publish(artifacts["bitfit"], "steady").version == 2


def test_offline_serves_cached_versions(
    hub: HubServer, artifacts: dict[str, Path], tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry("hf://team")
    reg.publish(artifacts["lora"], "local-first", base_fingerprint=fingerprint(tiny_base))
    reg.fetch("local-first")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = Registry("hf://team")
    assert offline.resolve("local-first").version == 1  # latest from the cache
    with Engine(tiny_base, offline, max_batch=1, max_seq_len=32) as engine:
        assert len(engine.generate([Request(prompt_ids=[5, 17], adapters=["local-first"])])[0].token_ids) > 0
    with pytest.raises(RegistryUnavailable, match="offline"):
        offline.resolve("math")


def test_cli_push_pull_and_mirror(
    hub: HubServer, artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hotswap.cli import main

    local = str(tmp_path / "local")
    push = ["--registry", local, "push", "--no-base"]
    assert main([*push, str(artifacts["lora"]), "--name", "tone", "--alias", "prod"]) == 0
    assert main([*push, str(artifacts["dora"]), "--name", "tone"]) == 0
    assert main([*push, str(artifacts["bitfit"]), "--name", "acme/secret"]) == 0
    capsys.readouterr()
    assert main(["mirror", local, "hf://team"]) == 0
    assert "3 version(s) copied" in capsys.readouterr().out
    hub_reg, local_reg = Registry("hf://team"), Registry(local)
    for ref in ("tone@1", "tone@2", "acme/secret@1"):
        a, b = hub_reg.resolve(ref), local_reg.resolve(ref)
        assert (a.files, a.created_at, a.method, a.visibility) == (b.files, b.created_at, b.method, b.visibility)
    assert hub_reg.aliases("tone") == {"prod": 1}
    assert main(["mirror", local, "hf://team"]) == 0  # idempotent
    assert "0 version(s) copied" in capsys.readouterr().out
    assert main(["pull", "hf://team/tone@2", "--to", str(tmp_path / "pulled")]) == 0
    assert "pulled tone@2" in capsys.readouterr().out
    assert (tmp_path / "pulled" / "adapter_model.safetensors").is_file()
    back = str(tmp_path / "back")
    assert main(["mirror", "hf://team", back, "tone"]) == 0  # Hub -> local, one name
    assert [m.version for m in Registry(back).versions("tone")] == [1, 2]
    refused = ["--registry", "hf://team", "push", "--no-base", str(artifacts["lora"]), "--name", "x", "--token", OTHER]
    assert main(refused) == 12
    assert "refused the token" in capsys.readouterr().err


class _Clock:
    """The registry's clock, moved by hand: the resolve cache's TTL without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_resolve_cache_saves_hub_calls_and_sees_its_own_writes(
    hub: HubServer, artifacts: dict[str, Path], tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact versions are cached for good, aliases and latest for the TTL: repeated resolves make no Hub call.
    This Registry's own publish and alias moves show at once; another writer's once the TTL has passed."""
    import hotswap.registry.registry as registry_module

    clock = _Clock()
    monkeypatch.setattr(registry_module, "time", clock)
    fp = fingerprint(tiny_base)
    reg = Registry("hf://team", resolve_ttl=5)
    reg.publish(artifacts["lora"], "cached", aliases=["prod"], base_fingerprint=fp)
    reg.publish(artifacts["lora2"], "cached", base_fingerprint=fp)

    def hub_calls(*refs: str) -> int:
        before = len(hub.requests)
        for ref in refs:
            reg.resolve(ref)
        return len(hub.requests) - before

    refs = ("cached@1", "cached:prod", "cached", "cached:latest")
    assert hub_calls(*refs) >= 2 * len(refs)  # the first time: versions, then aliases or the manifest
    assert hub_calls(*refs * 10) == 0
    assert Registry("hf://team", resolve_ttl=0).resolve("cached@1") and hub_calls(*refs) == 0
    # a server resolves the ref as written (cached: latest, above), the engine the exact version: a cache hit
    with Engine(tiny_base, reg, max_batch=2, max_seq_len=32) as engine:
        before = len(hub.requests)
        engine.submit(Request(prompt_ids=[5, 17], adapters=["cached@2"], max_new_tokens=2)).result()
        engine.submit(Request(prompt_ids=[5, 17], adapters=["cached@2"], max_new_tokens=2)).result()
        assert not [path for _, path in hub.requests[before:] if path.endswith("/refs")]  # only the download
        assert hub_calls("cached@2") == 0
    # this process's writes invalidate what they moved
    reg.set_alias("cached", "prod", 2)
    assert reg.resolve("cached:prod").version == 2
    assert reg.publish(artifacts["bitfit"], "cached").version == 3
    assert reg.resolve("cached").version == 3 and reg.resolve("cached:latest").version == 3
    reg.delete_alias("cached", "prod")
    with pytest.raises(AdapterNotFound, match="prod"):
        reg.resolve("cached:prod")
    assert reg.resolve("cached@1").version == 1 and hub_calls("cached@1") == 0  # exact versions stay cached
    # another writer's alias move shows once the TTL has passed
    reg.set_alias("cached", "prod", 1)
    assert reg.resolve("cached:prod").version == 1
    Registry("hf://team").set_alias("cached", "prod", 3)
    assert reg.resolve("cached:prod").version == 1  # within the TTL
    clock.now += 5
    assert reg.resolve("cached:prod").version == 3


def test_resolve_cache_is_bounded_and_refuses_a_negative_ttl(hub: HubServer, artifacts: dict[str, Path]) -> None:
    from hotswap.errors import InvalidArgument
    from hotswap.registry.registry import MAX_CACHED_RESOLVES

    with pytest.raises(InvalidArgument, match="resolve_ttl"):
        Registry("hf://team", resolve_ttl=-1)
    reg = Registry("hf://team", resolve_ttl=600)
    reg.publish(artifacts["lora"], "bounded")
    reg._resolved.size = 2  # type: ignore[union-attr]
    for ref in ("bounded@1", "bounded", "bounded:latest"):
        reg.resolve(ref)
    before = len(hub.requests)
    reg.resolve("bounded:latest")
    reg.resolve("bounded@1")  # kept with every resolve of an alias or latest: what the engine resolves next
    assert len(hub.requests) == before  # the two most recently used are kept
    reg.resolve("bounded")
    assert len(hub.requests) > before  # the least recently used was dropped
    assert MAX_CACHED_RESOLVES >= 1000
