"""Fault isolation in the engine: one request's or one adapter's failure ends that request alone; every other
row of the batch goes on and produces exactly the tokens it produces alone. Faults the engine cannot pin on
a request back off and turn the health check NOT_SERVING instead of spinning."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hotswap.errors import AdapterFault, ArtifactRejected, HotswapError, InvalidArgument
from hotswap.serve import Engine, Request
from hotswap.serve.engine.engine import UNHEALTHY_AFTER
from hotswap.serve.engine.sampling import RowSampler
from hotswap.serve.engine.types import EngineObserver
from hotswap.serve.model.layers import MultiAdapterLinear
from tests.serve.serverutil import make_server

PROMPT = [5, 17, 99, 3, 42]
NEIGHBOURS = [[], ["dora"], ["bitfit"], ["prefix"], [("lora4", 1.0), ("lora8qv", 0.5)], ["bottleneck"]]


def _request(adapters: list, n: int = 24) -> Request:
    return Request(prompt_ids=PROMPT, adapters=adapters, max_new_tokens=n, ignore_eos=True)


def _solo(eng: Engine, adapters: list) -> list[int]:
    return eng.generate([_request(adapters)])[0].token_ids


class _Health(EngineObserver):
    def __init__(self) -> None:
        self.changes: list[bool] = []

    def health(self, healthy: bool) -> None:
        self.changes.append(healthy)


@pytest.fixture
def eng(tiny_base: Path, registry_path: Path) -> Iterator[Engine]:
    with Engine(tiny_base, registry_path, max_batch=8, max_resident=8, max_seq_len=96, observer=_Health()) as e:
        yield e


def _neighbours_then(eng: Engine, culprit: Request) -> tuple[list, object]:
    """Submit the neighbours, then (a few steps later, mid-stream) the culprit; returns their handles."""
    handles = [eng.submit(_request(a)) for a in NEIGHBOURS]
    for h in handles:  # every neighbour is decoding before the culprit joins
        next(iter(h))
    return handles, eng.submit(culprit)


def test_exploding_adapter_ends_its_row_alone(eng: Engine) -> None:
    """A valid LoRA at an absurd (but finite, representable) weight drives its row's logits to inf/NaN:
    that row ends with AdapterFault naming the adapter and weight; the batch's other rows are unchanged."""
    expected = [_solo(eng, a) for a in NEIGHBOURS]
    handles, culprit = _neighbours_then(eng, _request([("lora4", 1e30)]))
    with pytest.raises(AdapterFault, match=r"NaN or infinite.*lora4@1 \(weight 1e\+30\)"):
        culprit.result(timeout=60)
    assert [h.result(timeout=60).token_ids for h in handles] == expected
    assert eng.counts() == (0, 0) and not any(eng.pool.refcount)


def test_adapter_whose_forward_fails_fails_alone(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault: one layer raises whenever a batch uses lora4b's slot (as a broken kernel for one
    adapter would). The batched step fails, the engine reruns rows one by one and pins it on that request."""
    expected = [_solo(eng, a) for a in NEIGHBOURS]
    eng.load_adapter("lora4b")
    poisoned = eng.pool.slot_of["lora4b@1"]
    layer = next(iter(eng.layers.values()))
    original = MultiAdapterLinear.forward

    def forward(self: MultiAdapterLinear, x: torch.Tensor) -> torch.Tensor:
        if self is layer and poisoned in self.plan.used:
            raise RuntimeError("injected kernel fault")
        return original(self, x)

    monkeypatch.setattr(MultiAdapterLinear, "forward", forward)
    handles, culprit = _neighbours_then(eng, _request(["lora4b"]))
    with pytest.raises(AdapterFault, match=r"lora4b@1 failed in the forward .*injected kernel fault"):
        culprit.result(timeout=60)
    assert [h.result(timeout=60).token_ids for h in handles] == expected
    assert eng.healthy and eng.observer.changes == []  # type: ignore[attr-defined]
    monkeypatch.setattr(MultiAdapterLinear, "forward", original)
    assert _solo(eng, ["lora4b"])  # the adapter itself serves again once the fault is gone


def test_install_failure_fails_that_adapters_requests_only(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [_solo(eng, a) for a in NEIGHBOURS]
    original = MultiAdapterLinear.set_slot

    def set_slot(self: MultiAdapterLinear, slot: int, delta: object) -> None:
        if delta is not None and delta.rank == 6:  # rslora: r=6
            raise RuntimeError("injected install fault")
        original(self, slot, delta)

    monkeypatch.setattr(MultiAdapterLinear, "set_slot", set_slot)
    handles, culprit = _neighbours_then(eng, _request(["rslora"]))
    with pytest.raises(ArtifactRejected, match="rslora@1: could not be installed"):
        culprit.result(timeout=60)
    assert [h.result(timeout=60).token_ids for h in handles] == expected
    assert "rslora@1" not in eng.resident()
    layers = eng.layers.values()
    empty = [s for s in range(1, 9) if s not in eng.pool.resident]
    assert not any(kind.holds(s) for layer in layers for kind in layer.kinds.values() for s in empty)


def test_a_row_whose_sampling_fails_ends_alone(eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault in one request's sampler (temperature 0.81): that request ends, greedy and other sampled rows
    of the same steps keep their tokens."""
    sampled = [Request(prompt_ids=PROMPT, adapters=["dora"], max_new_tokens=24, ignore_eos=True, temperature=0.8,
                       seed=s) for s in (7, 8)]  # fmt: skip
    expected = [_solo(eng, a) for a in NEIGHBOURS] + [r.token_ids for r in eng.generate(sampled)]
    original = RowSampler.sample

    def sample(self: RowSampler, logits: torch.Tensor) -> int:
        if self.temperature == 0.81:
            raise RuntimeError("injected sampler fault")
        return original(self, logits)

    monkeypatch.setattr(RowSampler, "sample", sample)
    handles = [eng.submit(_request(a)) for a in NEIGHBOURS] + [eng.submit(r) for r in sampled]
    for h in handles:
        next(iter(h))
    culprit = eng.submit(replace(sampled[0], temperature=0.81))
    with pytest.raises(HotswapError, match="sampling failed: RuntimeError: injected sampler fault"):
        culprit.result(timeout=60)
    assert [h.result(timeout=60).token_ids for h in handles] == expected


def test_unattributable_faults_back_off_and_turn_unhealthy(
    eng: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in the base forward itself (every row fails, even without adapters): each affected request
    fails once with an internal error, the traceback is logged once per failed step, the loop backs off
    instead of spinning, and after UNHEALTHY_AFTER failed steps the engine reports unhealthy; it recovers
    on the next good step."""
    broken = threading.Event()
    broken.set()
    runner_forward = eng.runner.forward

    def forward(*args: object, **kw: object) -> torch.Tensor:
        if broken.is_set():
            raise RuntimeError("injected base fault")
        return runner_forward(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(eng.runner, "forward", forward)
    caplog.set_level(logging.ERROR, logger="hotswap.serve.engine.engine")
    t0 = time.monotonic()
    for _ in range(UNHEALTHY_AFTER):
        with pytest.raises(HotswapError, match="engine step failed: RuntimeError: injected base fault") as err:
            eng.generate([_request([]), _request(["lora4"])])
        assert type(err.value) is HotswapError  # INTERNAL, not blamed on the request or the adapter
    _wait(lambda: not eng.healthy)  # the engine thread counts the step after failing its requests
    elapsed = time.monotonic() - t0
    assert eng.observer.changes == [False]  # type: ignore[attr-defined]
    tracebacks = [r for r in caplog.records if r.exc_info and "injected base fault" in str(r.exc_info[1])]
    assert len(tracebacks) == UNHEALTHY_AFTER  # once per failed step, not per retry or per loop turn
    assert elapsed >= 0.05 + 0.1  # the back-off after the first two failures (0.05 s, 0.1 s) was waited
    broken.clear()
    assert _solo(eng, ["lora4"])
    _wait(lambda: eng.healthy)
    assert eng.observer.changes == [False, True]  # type: ignore[attr-defined]


def test_engine_refuses_what_its_batch_cannot_represent(tiny_base: Path, registry_path: Path) -> None:
    with Engine(tiny_base, registry_path, max_batch=2, dtype="float16") as eng:
        with pytest.raises(InvalidArgument, match=r"adapter weight for lora4 must be within ±65504 \(float16\)"):
            eng.submit(Request(prompt_ids=PROMPT, adapters=[("lora4", 1e5)]))
        with pytest.raises(InvalidArgument, match="stop_token_ids must be below the vocabulary size"):
            eng.submit(Request(prompt_ids=PROMPT, stop_token_ids=[10**9]))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", float("nan"), "temperature must be a finite number >= 0, got nan"),
        ("temperature", float("inf"), "temperature must be a finite number >= 0, got inf"),
        ("temperature", -1.0, "temperature must be a finite number >= 0"),
        ("top_p", float("nan"), "top_p must be a finite number in"),
        ("top_p", 0.0, "top_p must be in"),
        ("top_p", 1.5, "top_p must be a finite number in"),
        ("top_k", -1, "top_k must be an integer >= 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("seed", 2**64, "seed must be an integer in"),
        ("seed", -1, "seed must be an integer in"),
        ("rank", 0, "rank must be an integer in"),
        ("rank", 2**40, "rank must be an integer in"),
        ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
        ("stop", ["x" * 300], "each stop string must have 1-256 characters"),
        ("stop", ["s"] * 17, "at most 16 stop strings"),
        ("stop_token_ids", [-1], "stop_token_ids must be an integer >= 0"),
        ("adapters", [("lora4", float("nan"))], "adapter weight for lora4 must be a finite number"),
        ("adapters", [("lora4", -1e300)], "adapter weight for lora4 must be a finite number in"),
        ("adapters", ["a" * 100_000], r"invalid adapter name 'aaaa.*… \(100000 chars\)"),
    ],
)
def test_request_fields_are_checked_by_name(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        Request(prompt_ids=PROMPT, **{field: value})  # type: ignore[arg-type]
    assert len(str(err.value)) < 400  # long input is quoted cut, never echoed whole


def test_tiny_temperature_is_greedy(eng: Engine) -> None:
    greedy = _solo(eng, ["lora4"])
    sampled = eng.generate([Request(prompt_ids=PROMPT, adapters=["lora4"], max_new_tokens=24, ignore_eos=True,
                                    temperature=1e-300, seed=3)])[0]  # fmt: skip
    assert sampled.token_ids == greedy


def test_server_health_follows_the_engine(
    text_base: Path, server_registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotswap.client import Client

    srv = make_server(text_base, server_registry).start()
    try:
        assert srv.engine is not None
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            monkeypatch.setattr(srv.engine.runner, "forward", _raise)
            for _ in range(UNHEALTHY_AFTER):
                with pytest.raises(HotswapError, match="engine step failed"):
                    c.generate(prompt_ids=PROMPT, max_new_tokens=2)
            _wait(lambda: c.health() == "NOT_SERVING")
            monkeypatch.undo()
            assert c.generate(prompt_ids=PROMPT, max_new_tokens=2).token_ids
            _wait(lambda: c.health() == "SERVING")
    finally:
        srv.stop(grace=1)


def _wait(condition: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def _raise(*args: object, **kw: object) -> torch.Tensor:
    raise RuntimeError("injected base fault")


def test_a_short_prefix_row_beside_a_long_prompt_prefills_in_one_batch(tiny_base: Path, registry_path: Path) -> None:
    """A prefix row's padding would run past the cache beside a prompt that nearly fills it; it is parked on
    the last position instead of failing the batch (which isolation would then have to rerun row by row)."""
    short = Request(prompt_ids=[5, 6], adapters=["prefix"], max_new_tokens=1)  # 5 virtual tokens + 2
    long = Request(prompt_ids=list(range(1, 31)), max_new_tokens=2)  # 30 of max_seq_len 32
    with Engine(tiny_base, registry_path, max_batch=2, max_seq_len=32) as eng:
        together = eng.forward_logits([short, long])
        alone = [eng.forward_logits([r])[0] for r in (short, long)]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_faulted_rows_cache_never_reaches_the_next_request_in_its_row(eng: Engine) -> None:
    """The exploding row wrote inf/NaN keys and values; the next request placed in that row, with a shorter
    prompt beside a longer one, attends over those positions masked: they must have been cleared."""
    long = Request(prompt_ids=list(range(1, 51)), max_new_tokens=40, ignore_eos=True)
    expected = [_solo(eng, []), eng.generate([long])[0].token_ids]
    running = eng.submit(long)
    next(iter(running))
    with pytest.raises(AdapterFault):
        eng.generate([Request(prompt_ids=list(range(100, 140)), adapters=[("lora4", 1e30)], max_new_tokens=4)])
    assert _solo(eng, []) == expected[0]  # takes the faulted request's row
    assert running.result(timeout=60).token_ids == expected[1]
