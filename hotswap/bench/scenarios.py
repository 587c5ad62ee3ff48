"""The benchmark scenarios of shared/BENCHMARK.md. Each returns rows whose ratios come from one run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from hotswap.basemodel import load_model
from hotswap.bench.common import (
    METHODS,
    Fixtures,
    hf_generate,
    median_seconds,
    peft_row_logits,
    percentile,
    requests,
    set_threads,
)

log = logging.getLogger(__name__)
CHECK_ROWS = 4  # rows per figure whose logits are compared with PEFT


def _tok_s(n_rows: int, new_tokens: int, seconds: float) -> float:
    return n_rows * new_tokens / seconds


def _max_diff(fx: Fixtures, engine: Any, peft: Any, prompts: list[list[int]], names: list[str | None]) -> float:
    reqs = requests(prompts, [[n] if n else [] for n in names], 1)
    ours = engine.forward_logits(reqs)
    return max(
        (o.cpu() - peft_row_logits(peft, p, n)).abs().max().item() for o, p, n in zip(ours, prompts, names, strict=True)
    )


def mixed(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """N distinct LoRA adapters in one batch (request i uses adapter i mod N) vs base and PEFT adapter_names."""
    rows: list[dict[str, Any]] = []
    hf_model = load_model(fx.base, device=fx.workload.device)
    for n in adapter_counts:
        row, base_row = _mixed_one(fx, n, hf_model)
        rows += [base_row, row] if not rows else [row]
        log.info("mixed N=%d: %s", n, row)
    return rows


def _mixed_one(fx: Fixtures, n: int, hf_model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    w = fx.workload
    batch = max(w.batch, n)
    names = fx.adapters("lora", n)
    prompts = fx.prompts(batch)
    row_adapters = [names[i % n] for i in range(batch)]
    base_reqs = requests(prompts, [[] for _ in prompts], w.new_tokens)
    mixed_reqs = requests(prompts, [[a] for a in row_adapters], w.new_tokens)
    with fx.engine(max_batch=batch) as engine:
        for name in names:
            engine.load_adapter(name)
        peft = fx.peft(names)
        set_threads()
        seconds = _interleaved(
            {
                "base": lambda: engine.generate(base_reqs),
                "mixed": lambda: engine.generate(mixed_reqs),
                "peft": lambda: hf_generate(peft, prompts, w.new_tokens, adapter_names=row_adapters),
                "hf": lambda: hf_generate(hf_model, prompts, w.new_tokens),
            },
            w.repeats,
        )
        diff = _max_diff(fx, engine, peft, prompts[:CHECK_ROWS], row_adapters[:CHECK_ROWS])
    tok = {k: _tok_s(batch, w.new_tokens, s) for k, s in seconds.items()}
    base_row = {
        "label": "base (no adapters)",
        "batch": batch,
        "tok_s": tok["base"],
        "hf_generate_tok_s": tok["hf"],
        "vs_hf_generate": tok["base"] / tok["hf"],
    }
    row = {
        "label": f"{n} adapters",
        "n_adapters": n,
        "batch": batch,
        "tok_s": tok["mixed"],
        "base_tok_s": tok["base"],
        "peft_tok_s": tok["peft"],
        "hf_generate_tok_s": tok["hf"],
        "vs_base": tok["mixed"] / tok["base"],
        "vs_peft": tok["mixed"] / tok["peft"],
        "vs_hf_generate": tok["base"] / tok["hf"],
        "max_abs_logit_diff": diff,
    }
    return row, base_row


def _interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per run; runs alternate within each repeat so machine noise hits all alike."""
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(median_seconds(fn, 1))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def swap(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """Requests one at a time, each for the next adapter: hotswap vs PEFT ``set_adapter`` per request."""
    return [_swap_one(fx, n) for n in adapter_counts]


def _swap_one(fx: Fixtures, n: int) -> dict[str, Any]:
    w = fx.workload
    names = fx.adapters("lora", n)
    prompts = fx.prompts(w.batch)
    order = [names[i % n] for i in range(w.batch)]

    def one_by_one(engine: Any, adapters: list[list[str]]) -> None:
        for p, a in zip(prompts, adapters, strict=True):
            engine.generate(requests([p], [a], w.new_tokens))

    def peft_swapping(peft: Any) -> None:
        for p, a in zip(prompts, order, strict=True):
            peft.set_adapter(a)
            hf_generate(peft, [p], w.new_tokens)

    with fx.engine(max_batch=w.batch) as engine:
        for name in names:
            engine.load_adapter(name)
        peft = fx.peft(names)
        set_threads()
        seconds = _interleaved(
            {
                "hotswap": lambda: one_by_one(engine, [[a] for a in order]),
                "base": lambda: one_by_one(engine, [[] for _ in order]),
                "peft": lambda: peft_swapping(peft),
            },
            w.repeats,
        )
        diff = _max_diff(fx, engine, peft, prompts[:CHECK_ROWS], order[:CHECK_ROWS])
    tok = {k: _tok_s(w.batch, w.new_tokens, s) for k, s in seconds.items()}
    return {
        "label": f"{n} adapters, one request at a time",
        "n_adapters": n,
        "requests": w.batch,
        "tok_s": tok["hotswap"],
        "base_tok_s": tok["base"],
        "peft_tok_s": tok["peft"],
        "vs_base": tok["hotswap"] / tok["base"],
        "vs_peft": tok["hotswap"] / tok["peft"],
        "max_abs_logit_diff": diff,
    }


def load(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """Cold load from the local registry to servable (fetch + sha256 verify + parse + install) vs PEFT load_adapter."""
    n = max(adapter_counts)
    names = fx.adapters("lora", n)
    ours, theirs = [], []
    with fx.engine(max_batch=1, max_resident=n) as engine:
        engine.load_adapter(names[0])  # warm-up: first use of the code paths
        engine.unload_adapter(names[0])
        for name in names:
            start = time.perf_counter()
            engine.load_adapter(name)
            ours.append((time.perf_counter() - start) * 1e3)
        peft = fx.peft(names[:1])
        set_threads()
        for i, name in enumerate(names):
            path = fx.artifact(name)
            start = time.perf_counter()
            peft.load_adapter(path, adapter_name=f"cold{i}")
            theirs.append((time.perf_counter() - start) * 1e3)
            peft.delete_adapter(f"cold{i}")
    p50, p95, peft50 = percentile(ours, 50), percentile(ours, 95), percentile(theirs, 50)
    return [
        {
            "label": f"LoRA r={fx.workload.rank}, {n} cold loads",
            "n_adapters": n,
            "load_ms_p50": p50,
            "load_ms_p95": p95,
            "peft_load_ms_p50": peft50,
            "peft_load_ms_p95": percentile(theirs, 95),
            "vs_peft": peft50 / p50,
        }
    ]


def methods(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """``mixed`` for each method with N distinct adapters, and one batch mixing all methods."""
    w = fx.workload
    n = min(max(adapter_counts), w.batch)
    prompts = fx.prompts(w.batch)
    per_method = {m: fx.adapters(m, n) for m in METHODS}
    batches = {m: [names[i % n] for i in range(w.batch)] for m, names in per_method.items()}
    batches["all methods"] = [per_method[METHODS[i % len(METHODS)]][(i // len(METHODS)) % n] for i in range(w.batch)]
    reqs = {label: requests(prompts, [[x] for x in a], w.new_tokens) for label, a in batches.items()}
    base_reqs = requests(prompts, [[] for _ in prompts], w.new_tokens)
    with fx.engine(max_batch=w.batch, max_resident=n * len(METHODS)) as engine:
        for names in per_method.values():
            for name in names:
                engine.load_adapter(name)
        runs: dict[str, Callable[[], object]] = {"base": lambda: engine.generate(base_reqs)}
        runs |= {label: partial(engine.generate, r) for label, r in reqs.items()}
        seconds = _interleaved(runs, w.repeats)
        diffs = {}
        for method in ("lora", "dora", "prefix", "prompt"):  # PEFT has these; BitFit is checked in the tests
            peft = fx.peft(per_method[method][:CHECK_ROWS])
            diffs[method] = _max_diff(fx, engine, peft, prompts[:CHECK_ROWS], batches[method][:CHECK_ROWS])
    rows = []
    base = _tok_s(w.batch, w.new_tokens, seconds["base"])
    for label in batches:
        tok = _tok_s(w.batch, w.new_tokens, seconds[label])
        rows.append(
            {
                "label": label,
                "method": label,
                "n_adapters": n,
                "tok_s": tok,
                "base_tok_s": base,
                "vs_base": tok / base,
                "max_abs_logit_diff": diffs.get(label),
            }
        )
    return rows


SCENARIOS: dict[str, Callable[[Fixtures, list[int]], list[dict[str, Any]]]] = {
    "mixed": mixed,
    "swap": swap,
    "load": load,
    "methods": methods,
}
