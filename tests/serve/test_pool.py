"""The adapter cache: eviction, pinning, draining unload, background loads; and the engine's refusals."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hotswap.errors import (
    AdapterNotFound,
    BaseModelMismatch,
    CapacityExceeded,
    EngineClosed,
    IntegrityError,
    InvalidArgument,
)
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import RandomLoraConfig, random_lora

PROMPT = [9, 8, 7, 6]


def _tokens(eng: Engine, name: str) -> list[int]:
    return eng.generate([Request(prompt_ids=PROMPT, adapters=[name], max_new_tokens=6, ignore_eos=True)])[0].token_ids


def test_lru_eviction_keeps_outputs_correct(engine: Engine, tiny_base: Path, registry_path: Path) -> None:
    expected = {n: _tokens(engine, n) for n in ("lora4", "dora", "bitfit")}
    with Engine(tiny_base, registry_path, max_batch=4, max_resident=2) as eng:
        for name in ["lora4", "dora", "bitfit", "lora4", "dora"]:
            assert _tokens(eng, name) == expected[name]
        assert eng.pool.stats.evictions >= 3
        assert eng.resident() == ["dora@1", "lora4@1"]  # least recently used (bitfit) went last
        assert eng.pool.stats.registry_loads + eng.pool.stats.host_hits >= 3


def test_pinned_adapters_are_not_evicted(tiny_base: Path, registry_path: Path) -> None:
    with Engine(tiny_base, registry_path, max_batch=4, max_resident=2) as eng:
        eng.load_adapter("lora4", pin=True)
        eng.load_adapter("dora", pin=True)
        blocked = eng.submit(Request(prompt_ids=PROMPT, adapters=["bitfit"], max_new_tokens=2))
        time.sleep(0.2)
        assert not blocked.done and eng.resident() == ["dora@1", "lora4@1"]
        eng.unload_adapter("dora")  # unpins and frees a slot
        assert blocked.result(timeout=30).finish_reason == "length"
        assert "lora4@1" in eng.resident() and "dora@1" not in eng.resident()


def test_unload_in_use_drains_first(tiny_base: Path, registry_path: Path, engine: Engine) -> None:
    expected = engine.generate([Request(prompt_ids=PROMPT, adapters=["lora4"], max_new_tokens=40, ignore_eos=True)])[
        0
    ].token_ids
    with Engine(tiny_base, registry_path, max_batch=4, max_resident=2) as eng:
        handle = eng.submit(Request(prompt_ids=PROMPT, adapters=["lora4"], max_new_tokens=40, ignore_eos=True))
        next(iter(handle))
        eng.unload_adapter("lora4")
        assert handle.result(timeout=30).token_ids == expected  # finished with its adapter intact
        assert "lora4@1" not in eng.resident()


def test_cold_adapter_does_not_stall_running_rows(tiny_base: Path, registry_path: Path) -> None:
    with Engine(tiny_base, registry_path, max_batch=4, max_resident=4) as eng:
        release = threading.Event()
        fetch = eng.pool.registry.fetch_read

        def slow_fetch(ref: str, *args: object, **kw: object):
            if ref.startswith("dora"):
                release.wait(30)
            return fetch(ref, *args, **kw)

        eng.pool.registry.fetch_read = slow_fetch  # type: ignore[method-assign]
        running = eng.submit(Request(prompt_ids=PROMPT, adapters=["lora4"], max_new_tokens=30, ignore_eos=True))
        next(iter(running))
        cold = eng.submit(Request(prompt_ids=PROMPT, adapters=["dora"], max_new_tokens=2))
        result = running.result(timeout=30)  # completes while dora's load is still blocked
        assert len(result.token_ids) == 30 and not cold.done
        release.set()
        assert cold.result(timeout=30).finish_reason == "length"
        assert cold.result().timings.queue_s > 0


def test_refusals_at_submit(engine: Engine, tiny_base: Path, other_base: Path, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    from hotswap.basemodel import fingerprint

    art = random_lora(other_base, tmp_path / "other", RandomLoraConfig(rank=2))
    reg.publish(art, "foreign", base_fingerprint=fingerprint(other_base))
    with Engine(tiny_base, reg, max_batch=2, max_seq_len=32) as eng:
        with pytest.raises(BaseModelMismatch):
            eng.submit(Request(prompt_ids=PROMPT, adapters=["foreign"]))
        with pytest.raises(AdapterNotFound):
            eng.submit(Request(prompt_ids=PROMPT, adapters=["ghost"]))
        with pytest.raises(InvalidArgument, match="max_seq_len"):
            eng.submit(Request(prompt_ids=PROMPT * 8, max_new_tokens=8))
        with pytest.raises(InvalidArgument, match="vocabulary"):
            eng.submit(Request(prompt_ids=[1, 10_000]))
        with pytest.raises(InvalidArgument, match="tokenizer"):
            eng.submit(Request(prompt="hello"))
    with pytest.raises(InvalidArgument):
        Request(prompt_ids=[])
    with pytest.raises(InvalidArgument):
        Request(prompt_ids=PROMPT, top_p=0)
    with pytest.raises(EngineClosed):
        eng.submit(Request(prompt_ids=PROMPT))


def test_prefix_and_prompt_cannot_be_weighted_or_combined(engine: Engine) -> None:
    with pytest.raises(InvalidArgument, match="cannot be weighted"):
        engine.submit(Request(prompt_ids=PROMPT, adapters=[("prefix", 0.5)]))
    with pytest.raises(InvalidArgument, match="at most one"):
        engine.submit(Request(prompt_ids=PROMPT, adapters=["prefix", "prompt"]))


def test_queue_full(tiny_base: Path, registry_path: Path) -> None:
    with Engine(tiny_base, registry_path, max_batch=1, max_queue=1, max_seq_len=4096) as eng:
        busy = eng.submit(Request(prompt_ids=PROMPT, max_new_tokens=4000, ignore_eos=True))
        next(iter(busy))
        eng.submit(Request(prompt_ids=PROMPT, max_new_tokens=1))  # fills the queue
        with pytest.raises(CapacityExceeded, match="queue is full"):
            eng.submit(Request(prompt_ids=PROMPT, max_new_tokens=1))
        busy.cancel()
        assert busy.result(timeout=30).finish_reason == "cancelled"
        assert len(eng.generate([Request(prompt_ids=PROMPT, max_new_tokens=2)])[0].token_ids) == 2  # recovered


def test_tampered_adapter_fails_its_request_only(tiny_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from hotswap.basemodel import fingerprint

    reg = Registry(tmp_path / "reg")
    reg.publish(adapters["lora4"], "good", base_fingerprint=fingerprint(tiny_base))
    reg.publish(adapters["lora4b"], "bad", base_fingerprint=fingerprint(tiny_base))
    stored = reg.fetch("bad")[1] / "adapter_model.safetensors"
    os.chmod(stored, 0o644)
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0x55
    stored.write_bytes(bytes(data))
    with Engine(tiny_base, reg, max_batch=4) as eng:
        bad = eng.submit(Request(prompt_ids=PROMPT, adapters=["bad"], max_new_tokens=2))
        good = eng.submit(Request(prompt_ids=PROMPT, adapters=["good"], max_new_tokens=2))
        with pytest.raises(IntegrityError, match="sha256"):
            bad.result(timeout=30)
        assert good.result(timeout=30).finish_reason == "length"
        with pytest.raises(IntegrityError):
            eng.load_adapter("bad")


def test_composed_request_never_evicts_its_own_adapter(engine: Engine, tiny_base: Path, registry_path: Path) -> None:
    """With one free slot, a two-adapter request must wait (not overwrite its first adapter's slot)."""
    composed = Request(
        prompt_ids=PROMPT, adapters=[("lora4", 1.0), ("lora8qv", 0.5)], max_new_tokens=6, ignore_eos=True
    )
    expected = engine.generate([composed])[0].token_ids
    with Engine(tiny_base, registry_path, max_batch=4, max_resident=2) as eng:
        eng.load_adapter("dora", pin=True)
        handle = eng.submit(composed)
        time.sleep(0.2)
        assert not handle.done  # needs two slots, only one is free
        eng.unload_adapter("dora")
        assert handle.result(timeout=30).token_ids == expected
        with pytest.raises(CapacityExceeded, match="max_resident"):
            eng.submit(Request(prompt_ids=PROMPT, adapters=["lora4", "lora8qv", "dora"]))
