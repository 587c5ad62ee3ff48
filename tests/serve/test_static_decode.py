"""The static decode (fixed shapes per batch bucket, the step CUDA graphs capture) gives the eager decode's tokens:
every method in one mixed batch with rows finishing at different steps (buckets and adapter layouts change), then
the same batch with other adapters of the same layouts (the step reused, its states refreshed), on the paged and the
static KV cache; dynamo traces that step whole (no host sync, no data-dependent shape), once per bucket and layout.
On CUDA (scripts/gpu_check.sh) the same test runs the captured CUDA graphs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from hotswap.errors import InvalidArgument
from hotswap.methods.lora.ops import UniqueFactors
from hotswap.serve import Engine, EngineConfig, Request
from hotswap.serve.model.graphs import OpaqueState, batch_buckets, copy_state, layout
from tests.serve.reference import TEST_DEVICE

NAMES = ["lora4", "dora", "bitfit", "prefix", "prompt", "fishmask", "bottleneck", "ia3", "proxy", None, "lora8qv"]
MODES = ["static", "cuda-graphs"] if TEST_DEVICE.startswith("cuda") else ["static"]


def _requests(lora: str) -> list[Request]:
    return [
        Request(
            prompt_ids=[(13 * i + 5 * j) % 250 + 3 for j in range(2 + 3 * i)],
            adapters=[lora if name == "lora4" else name] if name else [],
            max_new_tokens=3 + 2 * i,  # rows leave one by one: the batch bucket and the adapter layout change
            ignore_eos=True,
        )
        for i, name in enumerate(NAMES)
    ]


def _run(tiny_base: Path, registry_path: Path, decode: str, block: int) -> tuple[list[list[list[int]]], Engine]:
    with Engine(tiny_base, registry_path, max_batch=12, max_resident=12, max_seq_len=64, kv_block_size=block,
                prefix_cache=False, decode=decode, device=TEST_DEVICE) as engine:  # fmt: skip
        if decode == "static":  # traced whole by dynamo (no compiler): a host sync in any method's op would break it
            torch._dynamo.reset()  # dynamo's trace count per function is per process
            static = engine.runner.static
            static._forward = torch.compile(static._step, backend="eager", fullgraph=True, dynamic=False)
        # lora4b after lora4: same layouts, other factors
        return [[r.token_ids for r in engine.generate(_requests(lora))] for lora in ("lora4", "lora4b")], engine


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block", [4, 0], ids=["paged", "static-cache"])
def test_static_decode_gives_the_eager_tokens_for_every_method(
    tiny_base: Path, registry_path: Path, block: int, mode: str
) -> None:
    eager, _ = _run(tiny_base, registry_path, "eager", block)
    static, engine = _run(tiny_base, registry_path, mode, block)
    assert static == eager
    steps = engine.runner.static
    assert steps.eager_steps == 0, "every method's state is plain tensors: every full step was static"
    keys = list(steps.steps)
    assert {n for n, _, _ in keys} <= set(batch_buckets(12)) and len({n for n, _, _ in keys}) > 1
    assert len({layouts for _, _, layouts in keys}) > 1, "rows leaving changed the adapter layout"
    assert steps.new_steps == len(keys), "the second batch reused the first one's steps"
    if mode == "cuda-graphs":
        assert all(s.graph is not None for s in steps.steps.values())


@pytest.mark.slow
def test_compile_traces_the_step_whole_once_per_bucket_and_layout(tiny_base: Path, registry_path: Path) -> None:
    """torch.compile (inductor) with fullgraph=True: two adapters of one layout on the same rows share one trace
    (no recompilation), and the tokens are the eager decode's."""

    def requests(name: str) -> list[Request]:  # decode positions 4..6: one length bucket (8)
        return [
            Request(prompt_ids=[5 + i, 9, 11, 2], adapters=[name], max_new_tokens=4, ignore_eos=True) for i in (0, 1)
        ]

    with Engine(tiny_base, registry_path, max_batch=2, max_resident=4, max_seq_len=8, prefix_cache=False) as engine:
        eager = [[r.token_ids for r in engine.generate(requests(n))] for n in ("lora4", "lora4b")]
    with Engine(tiny_base, registry_path, max_batch=2, max_resident=4, max_seq_len=8, prefix_cache=False,
                decode="compile") as engine:  # fmt: skip
        graphs = counters["stats"]["unique_graphs"]
        compiled = [[r.token_ids for r in engine.generate(requests(n))] for n in ("lora4", "lora4b")]
        assert engine.runner.static.new_steps == 1 and engine.runner.static.eager_steps == 0
    assert counters["stats"]["unique_graphs"] == graphs + 1, "one trace: no recompilation, no graph break"
    assert compiled == eager


def test_buckets_and_layouts() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    a = UniqueFactors(torch.ones(4, 2), torch.ones(2, 3), None, None)
    b = UniqueFactors(torch.full((4, 2), 2.0), torch.full((2, 3), 3.0), None, None)
    assert layout(("unique", a)) == layout(("unique", b))
    assert layout(("unique", a)) != layout(("unique", UniqueFactors(a.a_t, a.b, None, torch.zeros(1, 1, 2) > 0)))
    assert layout((0.5, [a.b])) != layout((0.25, [a.b])), "plain values are baked into a step: part of its key"
    copy_state(("unique", a), ("unique", b))
    assert torch.equal(a.a_t, b.a_t) and torch.equal(a.b, b.b)

    @dataclass
    class Opaque:
        fn: object

    with pytest.raises(OpaqueState):
        layout((a, Opaque(print)))


def test_decode_mode_is_checked(tiny_base: Path, registry_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="decode must be one of eager, static, compile, cuda-graphs"):
        EngineConfig(decode="graphs")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="'cuda-graphs' needs a CUDA device"):
            Engine(tiny_base, registry_path, max_batch=2, device="cpu", decode="cuda-graphs")
