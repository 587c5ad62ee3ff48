"""Continuous batching, sampling, streaming, cancellation, stops, and the frozen base."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from hotswap.errors import AdapterNotFound
from hotswap.methods.api import BatchPlan
from hotswap.serve import Engine, EngineObserver, Request
from hotswap.serve.model.layers import MultiAdapterLinear

PROMPT = [5, 17, 99, 3, 42]


def test_output_does_not_depend_on_batch_neighbours(engine: Engine) -> None:
    target = Request(prompt_ids=PROMPT, adapters=["lora4"], max_new_tokens=24, ignore_eos=True)
    alone = engine.generate([target])[0].token_ids
    handle = engine.submit(target)
    others = []
    for i, name in enumerate(["dora", "prefix", "prompt", "bitfit", "lora8qv", "lora4b"]):
        others.append(
            engine.submit(
                Request(
                    prompt_ids=[(3 * i + j) % 200 + 1 for j in range(2 + 2 * i)],
                    adapters=[name],
                    max_new_tokens=1 + 3 * i,
                    ignore_eos=True,
                )
            )
        )
        time.sleep(0.002)  # join at different steps; some finish (leave) before the target does
    assert handle.result(timeout=60).token_ids == alone
    assert all(len(h.result(timeout=60).token_ids) == 1 + 3 * i for i, h in enumerate(others))


def test_finished_rows_are_reused(tiny_base: Path, registry_path: Path) -> None:
    with Engine(tiny_base, registry_path, max_batch=2, max_resident=4) as eng:
        reqs = [
            Request(prompt_ids=PROMPT[: 1 + i], adapters=["lora4"] if i % 2 else [], max_new_tokens=3 + i)
            for i in range(5)
        ]
        results = eng.generate(reqs)
        assert [len(r.token_ids) for r in results] == [3, 4, 5, 6, 7]
        assert all(r.finish_reason == "length" for r in results)


def test_base_weights_stay_bit_identical(engine: Engine) -> None:
    before = {k: v.clone() for k, v in engine.model.state_dict().items() if not k.endswith((".A", ".B"))}
    names = ["lora4", "dora", "bitfit", "prefix", "prompt", "pattern"]
    engine.generate([Request(prompt_ids=PROMPT, adapters=[n], max_new_tokens=4) for n in names])
    after = engine.model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())


def test_sampling_is_seeded_per_request(engine: Engine) -> None:
    def sample(seed: int, neighbours: int) -> list[int]:
        req = Request(
            prompt_ids=PROMPT,
            adapters=["lora4"],
            max_new_tokens=12,
            temperature=1.5,
            top_p=0.95,
            seed=seed,
            ignore_eos=True,
        )
        noise = [
            Request(prompt_ids=[7] * (i + 2), max_new_tokens=5, temperature=1.0, seed=i) for i in range(neighbours)
        ]
        return engine.generate([req, *noise])[0].token_ids

    assert sample(1, 0) == sample(1, 5) == sample(1, 2)
    assert sample(1, 0) != sample(2, 0)


def test_greedy_ignores_seed_and_top_k_1_is_greedy(engine: Engine) -> None:
    greedy = engine.generate([Request(prompt_ids=PROMPT, adapters=["dora"], max_new_tokens=8, ignore_eos=True)])
    seeded = engine.generate([Request(prompt_ids=PROMPT, adapters=["dora"], max_new_tokens=8, seed=9, ignore_eos=True)])
    top1 = engine.generate(
        [
            Request(
                prompt_ids=PROMPT,
                adapters=["dora"],
                max_new_tokens=8,
                temperature=2.0,
                top_k=1,
                seed=3,
                ignore_eos=True,
            )
        ]
    )
    assert greedy[0].token_ids == seeded[0].token_ids == top1[0].token_ids


def test_stop_token_and_length(engine: Engine) -> None:
    free = engine.generate([Request(prompt_ids=PROMPT, max_new_tokens=8, ignore_eos=True)])[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = engine.generate([Request(prompt_ids=PROMPT, max_new_tokens=8, stop_token_ids=[stop_at])])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first]
    assert free.finish_reason == "length" and len(free.token_ids) == 8


def test_streaming_yields_the_result_tokens_and_timings_are_consistent(engine: Engine) -> None:
    handle = engine.submit(Request(prompt_ids=PROMPT, adapters=["prefix"], max_new_tokens=10, ignore_eos=True))
    streamed = list(handle)
    result = handle.result()
    assert streamed == result.token_ids and len(streamed) == 10
    t = result.timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.total_s
    assert len(t.token_times_s) == 10 and t.token_times_s == sorted(t.token_times_s)
    assert t.token_times_s[0] == t.ttft_s and result.prompt_tokens == len(PROMPT)
    assert result.adapters == [("prefix@1", 1.0)]


def test_cancel_frees_the_row(tiny_base: Path, registry_path: Path) -> None:
    with Engine(tiny_base, registry_path, max_batch=1, max_resident=2, max_seq_len=4096) as eng:
        long = eng.submit(Request(prompt_ids=PROMPT, max_new_tokens=4000, ignore_eos=True))
        next(iter(long))  # it is running
        waiting = eng.submit(Request(prompt_ids=PROMPT, adapters=["lora4"], max_new_tokens=2))
        time.sleep(0.05)
        assert not waiting.done  # the only row is busy
        long.cancel()
        cancelled = long.result(timeout=30)
        assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.token_ids) < 4000
        assert waiting.result(timeout=30).finish_reason == "length"


class _Steps(EngineObserver):
    """The batch size of every decode step."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def step(self, batch_size: int) -> None:
        self.sizes.append(batch_size)


def test_generate_admits_its_requests_together(tiny_base: Path, registry_path: Path) -> None:
    """An offline batch is one batch: every decode step runs all of its rows (each request's adapter resolved from
    the registry first, none of them already started while the others were still being checked)."""
    steps = _Steps()
    with Engine(tiny_base, registry_path, max_batch=8, max_resident=8, observer=steps) as eng:
        names = ["lora4", "dora", "lora8qv", "lora4b"]
        for name in names:
            eng.load_adapter(name)
        reqs = [Request(prompt_ids=PROMPT, adapters=[n], max_new_tokens=4, ignore_eos=True) for n in names * 2]
        for _ in range(3):
            steps.sizes.clear()
            assert all(len(r.token_ids) == 4 for r in eng.generate(reqs))
            assert steps.sizes == [8, 8, 8], "the rows were prefilled and decoded as one batch"


def test_generate_queues_nothing_when_one_request_is_bad(tiny_base: Path, registry_path: Path) -> None:
    steps = _Steps()
    with Engine(tiny_base, registry_path, max_batch=4, max_resident=4, observer=steps) as eng:
        good = Request(prompt_ids=PROMPT, adapters=["lora4"], max_new_tokens=2)
        with pytest.raises(AdapterNotFound):
            eng.generate([good, Request(prompt_ids=PROMPT, adapters=["no-such-adapter"], max_new_tokens=2)])
        time.sleep(0.2)
        assert steps.sizes == [], "the good request of a refused batch was never queued"
        assert len(eng.generate([good])[0].token_ids) == 2


class _ThreadProbe(nn.Linear):
    """A linear that records the CPU threads its forward runs on, and refuses a NaN input."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.threads: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        if x.isnan().any():
            raise RuntimeError("bad input")
        return super().forward(x)


def test_the_base_product_runs_on_its_own_threads_and_the_step_keeps_its_own() -> None:
    probe = _ThreadProbe()
    layer = MultiAdapterLinear(probe, BatchPlan(), 2, torch.float32)
    layer.base_threads = 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a decode step's
        layer(torch.ones(1, 1, 4))
        with pytest.raises(RuntimeError, match="bad input"):
            layer(torch.full((1, 1, 4), float("nan")))
        assert torch.get_num_threads() == 1, "the step's threads are back after the product, raised or not"
    finally:
        torch.set_num_threads(before)
    assert probe.threads == [2, 2]


def test_the_engine_gives_decode_base_products_the_prefill_threads(tiny_base: Path, registry_path: Path) -> None:
    with Engine(tiny_base, registry_path, max_batch=2, prefill_threads=2, decode_threads=1) as eng:
        linears = [m for m in eng.layers.values() if isinstance(m, MultiAdapterLinear)]
        assert linears and all(m.base_threads == 2 for m in linears)
