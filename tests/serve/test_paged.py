"""The paged KV cache, prefix caching and chunked prefill give the static cache's answers: every method in one mixed
batch, rows of very different lengths, a sliding-window family; prefix blocks never cross serving keys; a full
pool queues requests and preempts rows, which are recomputed with the same output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotswap.basemodel import build_model, fingerprint, save_model
from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.serve import Engine, EngineObserver, Request
from hotswap.serve.model.kvcache import BlockPool, PagedCache, block_digests
from hotswap.train import RandomLoraConfig, random_lora, random_prefix

NAMES = ["lora4", "dora", "bitfit", "prefix", "prompt", "fishmask", "bottleneck", "ia3", "proxy", None]
LENGTHS = [3, 37, 9, 1, 22, 5, 14, 2, 30, 11]  # very different lengths, several past a block's end
BLOCK = 4
TINY_BLOCK_BYTES = PagedCache.block_bytes(2, BLOCK, 2, 16, torch.float32)  # the tiny base: 2 layers, 2 kv heads


class Counting(EngineObserver):
    def __init__(self) -> None:
        self.hits: list[tuple[list[tuple[str, float]], int]] = []
        self.preemptions = 0

    def prefix_hit(self, adapters: list[tuple[str, float]], tokens: int) -> None:
        self.hits.append((adapters, tokens))

    def preempted(self) -> None:
        self.preemptions += 1


def _requests(new: int = 10, seed_shift: int = 0) -> list[Request]:
    return [
        Request(
            prompt_ids=[(11 * i + 7 * j + seed_shift) % 250 + 3 for j in range(n)],
            adapters=[name] if name else [],
            max_new_tokens=new,
            ignore_eos=True,
        )
        for i, (name, n) in enumerate(zip(NAMES, LENGTHS, strict=True))
    ]


@pytest.fixture(scope="module")
def static_run(tiny_base: Path, registry_path: Path) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prompt logits and greedy tokens of the mixed batch with the static per-row cache."""
    with Engine(tiny_base, registry_path, max_batch=10, max_resident=10, max_seq_len=64, kv_block_size=0) as engine:
        assert not isinstance(engine.runner.cache, PagedCache)
        return engine.forward_logits(_requests()), [r.token_ids for r in engine.generate(_requests())]


def test_paged_equals_static_for_every_method(tiny_base: Path, registry_path: Path, static_run: tuple) -> None:
    logits, tokens = static_run
    with Engine(tiny_base, registry_path, max_batch=10, max_resident=10, max_seq_len=64, kv_block_size=BLOCK,
                prefix_cache=False) as engine:  # fmt: skip
        assert isinstance(engine.runner.cache, PagedCache)
        for ours, ref in zip(engine.forward_logits(_requests()), logits, strict=True):
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert [r.token_ids for r in engine.generate(_requests())] == tokens


def test_prefix_cache_hits_give_the_same_tokens(tiny_base: Path, registry_path: Path, static_run: tuple) -> None:
    observer = Counting()
    with Engine(tiny_base, registry_path, max_batch=10, max_resident=10, max_seq_len=64, kv_block_size=BLOCK,
                observer=observer) as engine:  # fmt: skip
        first = [r.token_ids for r in engine.generate(_requests())]
        assert not observer.hits, "a cold cache has nothing to share"
        second = [r.token_ids for r in engine.generate(_requests())]
    assert first == second == static_run[1]
    hit = {tuple(a): n for a, n in observer.hits}
    context = {"prefix": 5, "prompt": 3}  # the fixtures' prefix keys/values and virtual tokens come first
    for name, n in zip(NAMES, LENGTHS, strict=True):
        adapters = ((f"{name}@1", 1.0),) if name else ()
        shareable = (context.get(name, 0) + n - 1) // BLOCK * BLOCK  # the block of the last position is computed
        if name == "proxy" or not shareable:  # proxy rows share nothing
            assert adapters not in hit, name
        else:
            assert hit[adapters] == shareable, name


def test_chunked_prefill_gives_the_same_tokens(tiny_base: Path, registry_path: Path, static_run: tuple) -> None:
    with Engine(tiny_base, registry_path, max_batch=10, max_resident=10, max_seq_len=64, kv_block_size=BLOCK,
                max_prefill_tokens=7, prefix_cache=False) as engine:  # fmt: skip
        assert [r.token_ids for r in engine.generate(_requests())] == static_run[1]


def test_a_full_pool_queues_and_preempts_with_the_same_output(
    tiny_base: Path, registry_path: Path, static_run: tuple
) -> None:
    """Room for 24 blocks: the ten rows need 53 for their prompts alone and 76 at their longest, so requests wait for
    blocks and running rows are preempted when a decode step needs a block, then recomputed."""
    observer = Counting()
    with Engine(tiny_base, registry_path, max_batch=10, max_resident=10, max_seq_len=64, kv_block_size=BLOCK,
                kv_cache_memory=24 * TINY_BLOCK_BYTES, prefix_cache=False, observer=observer) as engine:  # fmt: skip
        assert engine.runner.cache.pool.num_blocks == 24
        assert [r.token_ids for r in engine.generate(_requests())] == static_run[1]
    assert observer.preemptions > 0


def test_a_pool_smaller_than_one_row_is_refused(tiny_base: Path, registry_path: Path) -> None:
    """The engine holds one row of max_seq_len at least, so any request it accepts can run once others finish."""
    with pytest.raises(InvalidArgument, match=r"holds 15 blocks of 4 positions .* one row of max_seq_len 64 needs 16"):
        Engine(tiny_base, registry_path, max_seq_len=64, kv_block_size=BLOCK, kv_cache_memory=15 * TINY_BLOCK_BYTES)


def test_two_adapters_and_two_versions_never_share_blocks(tiny_base: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    fp = fingerprint(tiny_base)
    for i, name in enumerate(["a", "b", "a"]):  # a@1, b@1, then a@2 with other weights
        lora = random_lora(tiny_base, tmp_path / f"{name}{i}", RandomLoraConfig(rank=4, seed=i, init_std=0.2))
        registry.publish(lora, name, base_fingerprint=fp)
    prompt = [(5 * j) % 250 + 3 for j in range(21)]

    def ask(engine: Engine, adapters: list[str]) -> list[int]:
        return engine.generate([Request(prompt_ids=prompt, adapters=adapters, max_new_tokens=8)])[0].token_ids

    with Engine(tiny_base, registry, max_batch=4, max_seq_len=64, kv_block_size=0) as cold:
        expected = {ref: ask(cold, [ref] if ref else []) for ref in ["a@1", "b@1", "a@2", None]}
    observer = Counting()
    with Engine(tiny_base, registry, max_batch=4, max_seq_len=64, kv_block_size=BLOCK, observer=observer) as engine:
        for ref in ["a@1", "b@1", "a@2", None]:  # the same prompt under four serving keys: no hits
            assert ask(engine, [ref] if ref else []) == expected[ref]
        assert observer.hits == []
        assert ask(engine, ["a@1"]) == expected["a@1"]  # the same key again: a hit
        assert observer.hits == [([("a@1", 1.0)], 20)]
        engine.unload_adapter("a@1")  # its blocks go with it
        assert ask(engine, ["a@1"]) == expected["a@1"]
        assert observer.hits == [([("a@1", 1.0)], 20)]


def test_sliding_window_family_paged_and_chunked(tmp_path: Path) -> None:
    base = save_model(build_model("tiny-mistral", seed=0, initializer_range=0.1), tmp_path / "base")
    prefix = random_prefix(base, tmp_path / "prefix", num_virtual_tokens=5, seed=1)
    registry = Registry(tmp_path / "registry")
    registry.publish(prefix, "prefix", base_fingerprint=fingerprint(base))
    requests = [
        Request(prompt_ids=[(3 * i + j) % 250 + 3 for j in range(n)], adapters=a, max_new_tokens=12, ignore_eos=True)
        for i, (n, a) in enumerate([(30, []), (3, ["prefix"]), (19, ["prefix"]), (9, [])])
    ]
    runs = []
    for kw in ({"kv_block_size": 0}, {"kv_block_size": BLOCK, "max_prefill_tokens": 6}):
        with Engine(base, registry, max_batch=4, max_seq_len=64, **kw) as engine:
            runs.append([r.token_ids for r in engine.generate(requests)])
            runs.append([r.token_ids for r in engine.generate(requests)])  # again: prefix hits when paged
    assert runs[0] == runs[1] == runs[2] == runs[3]


def test_block_pool_reuses_cached_blocks_last_and_forgets_dropped_adapters() -> None:
    pool = BlockPool(3)
    a, _ = pool.allocate()
    b, _ = pool.allocate()
    pool.register(a, b"da", ["x@1"])
    assert pool.release([a, b]) == [b], "a cached block is kept, an uncached one is free"
    assert pool.available() == 3 and pool.used() == 0
    assert pool.lookup([b"da", b"db"]) == [a] and pool.refs[a] == 1
    pool.release([a])
    c, dirty = pool.allocate()
    d, _ = pool.allocate()
    assert not dirty and a not in (c, d), "free blocks go before cached ones"
    e, dirty = pool.allocate()
    assert e == a and dirty and pool.lookup([b"da"]) == [], "the last resort: the LRU cached block, forgotten"
    pool.release([e])
    pool.register(e, b"de", ["y@1"])
    assert pool.lookup([b"de"]) == [e]
    pool.release([e])
    assert pool.drop("y@1") == [e] and pool.lookup([b"de"]) == []


def test_digests_chain_over_the_key_and_the_whole_prefix() -> None:
    tokens = list(range(12))
    same = block_digests(b"k", tokens, 4)
    assert len(same) == 3 and same == block_digests(b"k", [*tokens, 99], 4)
    assert block_digests(b"other", tokens, 4)[0] != same[0], "another serving key shares nothing"
    changed = block_digests(b"k", [7, *tokens[1:]], 4)
    assert changed[0] != same[0] and changed[2] != same[2], "a later block depends on every earlier token"


def test_kv_metrics(tiny_base: Path, registry_path: Path) -> None:
    """Blocks used/free after each step, prefix-cache hit tokens per adapter, preemptions: Prometheus series."""
    from hotswap.serve.api.metrics import Metrics

    metrics = Metrics()
    with Engine(tiny_base, registry_path, max_batch=10, max_resident=10, max_seq_len=64, kv_block_size=BLOCK,
                kv_cache_memory=24 * TINY_BLOCK_BYTES, observer=metrics, prefix_cache=False) as engine:  # fmt: skip
        engine.generate(_requests())  # preempts
    with Engine(tiny_base, registry_path, max_batch=10, max_resident=10, max_seq_len=64, kv_block_size=BLOCK,
                observer=metrics) as engine:  # fmt: skip
        engine.generate(_requests()[:2])
        engine.generate(_requests()[:2])  # lora4's 3 tokens share nothing; dora's 37 share 9 blocks
        blocks = engine.runner.cache.pool.num_blocks

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("hotswap_prefix_cache_hit_tokens_total", adapter="dora@1") == 36
    assert sample("hotswap_prefix_cache_hit_tokens_total", adapter="lora4@1") is None
    assert sample("hotswap_preemptions_total") > 0
    assert sample("hotswap_kv_blocks_used") + sample("hotswap_kv_blocks_free") == blocks
