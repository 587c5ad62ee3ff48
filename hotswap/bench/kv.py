"""``hotswap bench kv``: the paged KV cache, prefix caching and chunked prefill, each side by side in one run.

- **concurrency**: requests with Zipf-distributed prompt lengths (32 to 2,048 tokens) against the same KV bytes,
  held as a static cache (rows × max_seq_len, so ``STATIC_ROWS`` rows) or paged: rows running at once, and tok/s.
- **prefix reuse**: N adapters, each request one of 4 shared 512-token system prompts and a 32-token question,
  asked by 4 clients at a time: TTFT p50 with the prefix cache ÷ without, and hit tokens / prompt tokens.
- **chunked prefill**: a 2,048-token prompt arrives while 15 rows decode: their inter-token p95 with chunks of
  ``CHUNK`` positions ÷ whole-prompt prefill.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import AutoConfig

from hotswap.bench.common import Fixtures, percentile, set_threads
from hotswap.devices import torch_dtype
from hotswap.serve import Engine, EngineObserver, Request
from hotswap.serve.model.kvcache import PagedCache
from hotswap.serve.model.runner import kv_shape

log = logging.getLogger(__name__)

LONGEST = 2048  # prompt tokens
STATIC_ROWS = 4  # the static cache's rows at the KV bytes both sides get
CONCURRENT_REQUESTS = 32
SYSTEM_PROMPTS, SYSTEM_LEN, QUESTION_LEN, CLIENTS = 4, 512, 32, 4
DECODING_ROWS, CHUNK = 15, 256


class _Watch(EngineObserver):
    """Rows per decode step, and prefix-cache hit tokens."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.hit_tokens = 0

    def step(self, batch_size: int) -> None:
        self.batch_sizes.append(batch_size)

    def prefix_hit(self, adapters: list[tuple[str, float]], tokens: int) -> None:
        self.hit_tokens += tokens


def kv(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    set_threads()
    return [*_concurrency(fx), *_prefix_reuse(fx, adapter_counts[0]), *_chunked(fx)]


def _engine(fx: Fixtures, watch: EngineObserver, max_seq_len: int, **kw: Any) -> Engine:
    w = fx.workload
    return Engine(fx.base, fx.registry, device=w.device, dtype=fx.dtype, max_seq_len=max_seq_len, observer=watch, **kw)


def _prompt(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _position_bytes(fx: Fixtures) -> int:
    """KV bytes of one cache position of the base, in the bench's dtype."""
    shape = kv_shape(AutoConfig.from_pretrained(fx.base))
    return PagedCache.block_bytes(*shape, 1, torch_dtype(fx.dtype))


def _vocab(fx: Fixtures) -> int:
    return json.loads((fx.base / "config.json").read_text())["vocab_size"]


def _concurrency(fx: Fixtures) -> list[dict[str, Any]]:
    w, g = fx.workload, torch.Generator().manual_seed(fx.workload.seed)
    vocab = _vocab(fx)
    u = torch.rand(CONCURRENT_REQUESTS, generator=g)
    lengths = [min(LONGEST, int(32 * x ** (-1 / 1.2))) for x in u.tolist()]  # Zipf-like: most short, a long tail
    requests = [Request(prompt_ids=_prompt(g, n, vocab), max_new_tokens=w.new_tokens, ignore_eos=True) for n in lengths]
    max_seq_len = LONGEST + w.new_tokens
    kv_bytes = STATIC_ROWS * (max_seq_len + 1) * _position_bytes(fx)  # the static cache's (+1: its scratch position)
    rows = []
    for label, kw in (
        ("static", {"kv_block_size": 0, "max_batch": STATIC_ROWS}),
        ("paged", {"max_batch": CONCURRENT_REQUESTS, "prefix_cache": False, "kv_cache_memory": float(kv_bytes)}),
    ):
        watch = _Watch()
        with _engine(fx, watch, max_seq_len, **kw) as engine:
            start = time.perf_counter()
            engine.generate(requests)
            seconds = time.perf_counter() - start
        rows.append({
            "label": f"concurrency: {label} cache", "kv_bytes": kv_bytes, "requests": len(requests),
            "mean_prompt": statistics.mean(lengths), "max_rows": max(watch.batch_sizes),
            "mean_rows": statistics.mean(watch.batch_sizes), "tok_s": len(requests) * w.new_tokens / seconds,
        })  # fmt: skip
        log.info("%s", rows[-1])
    rows[1]["rows_vs_static"] = rows[1]["max_rows"] / rows[0]["max_rows"]
    rows[1]["tok_s_vs_static"] = rows[1]["tok_s"] / rows[0]["tok_s"]
    return rows


def _prefix_reuse(fx: Fixtures, n_adapters: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(fx.workload.seed + 1)
    vocab = _vocab(fx)
    names = fx.adapters("lora", n_adapters)
    systems = [_prompt(g, SYSTEM_LEN, vocab) for _ in range(SYSTEM_PROMPTS)]
    keys = [(a, s) for a in range(n_adapters) for s in range(SYSTEM_PROMPTS)]
    order = [keys[i % len(keys)] for i in range(3 * len(keys))]  # every key thrice: its first ask misses
    requests = [
        Request(prompt_ids=systems[s] + _prompt(g, QUESTION_LEN, vocab), adapters=[names[a]], max_new_tokens=4)
        for a, s in order
    ]
    max_seq_len = SYSTEM_LEN + QUESTION_LEN + 8
    # room for every key's system prompt beside the running rows: the figure is reuse, not LRU thrashing
    memory = (len(keys) + CLIENTS) * max_seq_len * _position_bytes(fx)
    rows = []
    for cached in (False, True):
        watch = _Watch()
        with _engine(
            fx, watch, max_seq_len, max_batch=CLIENTS, prefix_cache=cached, kv_cache_memory=float(memory)
        ) as engine:
            for name in names:
                engine.load_adapter(name)
            with ThreadPoolExecutor(CLIENTS) as clients:  # closed loop: each client asks, waits, asks again
                ttft = list(clients.map(lambda r: engine.generate([r])[0].timings.ttft_s, requests))
        prompt_tokens = sum(len(r.prompt_ids or []) for r in requests)
        rows.append({
            "label": f"prefix reuse: {'prefix cache' if cached else 'no prefix cache'}", "adapters": n_adapters,
            "requests": len(requests), "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "hit_tokens_per_prompt_token": watch.hit_tokens / prompt_tokens,
        })  # fmt: skip
        log.info("%s", rows[-1])
    rows[1]["ttft_p50_vs_uncached"] = rows[1]["ttft_p50_s"] / rows[0]["ttft_p50_s"]
    return rows


def _chunked(fx: Fixtures) -> list[dict[str, Any]]:
    w, g = fx.workload, torch.Generator().manual_seed(fx.workload.seed + 2)
    vocab = _vocab(fx)
    decoding = [Request(prompt_ids=_prompt(g, w.prompt, vocab), max_new_tokens=16, ignore_eos=True)
                for _ in range(DECODING_ROWS)]  # fmt: skip
    long = Request(prompt_ids=_prompt(g, LONGEST, vocab), max_new_tokens=4, ignore_eos=True)
    rows = []
    for chunk in (0, CHUNK):
        watch = _Watch()
        with _engine(fx, watch, LONGEST + 16, max_batch=DECODING_ROWS + 1, max_prefill_tokens=chunk,
                     prefix_cache=False) as engine:  # fmt: skip
            handles = [engine.submit(r) for r in decoding]
            for handle in handles:
                handle.next_delta()  # wait for each row's first token: all of them decode now
            late = engine.submit(long)
            results = [h.result() for h in handles]
            late.result()
        gaps = [b - a for r in results for a, b in itertools.pairwise(r.timings.token_times_s)]
        rows.append({
            "label": f"chunked prefill: {f'chunks of {chunk}' if chunk else 'whole prompt'}",
            "decoding_rows": DECODING_ROWS, "long_prompt": LONGEST, "inter_token_p50_s": percentile(gaps, 50),
            "inter_token_p95_s": percentile(gaps, 95), "inter_token_max_s": max(gaps),
        })  # fmt: skip
        log.info("%s", rows[-1])
    rows[1]["inter_token_p95_vs_whole"] = rows[1]["inter_token_p95_s"] / rows[0]["inter_token_p95_s"]
    return rows
