"""The benchmark scenarios (docs/benchmarks.md). Each returns rows whose ratios come from one run."""

from __future__ import annotations

import itertools
import logging
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

from hotswap.bench.common import (
    CHECK_ROWS,
    METHODS,
    Fixtures,
    hf_generate,
    interleaved,
    max_logit_diff,
    model_bytes,
    percentile,
    requests,
    roofline,
    roofline_fields,
    seconds,
    set_threads,
    summary,
)
from hotswap.bench.moe import moe_rows
from hotswap.bench.training import train_bench
from hotswap.client import Client
from hotswap.devices import DECODE_CHOICES
from hotswap.errors import InvalidArgument
from hotswap.methods import load_adapter, registered
from hotswap.methods.api import BaseInfo, read_weights
from hotswap.registry.artifact import verify
from hotswap.serve import EngineObserver

log = logging.getLogger(__name__)


def mixed(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """N distinct LoRA adapters in one batch (request i uses adapter i mod N) vs base and PEFT adapter_names."""
    rows: list[dict[str, Any]] = []
    hf_model = fx.load_base()
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
    memory: dict[str, float] = {}
    with ExitStack() as stack:
        engine = stack.enter_context(fx.engine(max_batch=batch))
        refs = [engine.load_adapter(name) for name in names]
        peft = fx.peft(names)
        runs = {
            "base": lambda: engine.generate(base_reqs),
            "mixed": lambda: engine.generate(mixed_reqs),
            "peft": lambda: hf_generate(peft, prompts, w.new_tokens, adapter_names=row_adapters),
            "hf": lambda: hf_generate(hf_model, prompts, w.new_tokens),
        }
        if fx.quantize:  # the float base beside the quantized one
            float_engine = stack.enter_context(fx.engine(max_batch=batch, float_base=True))
            runs["float_base"] = lambda: float_engine.generate(base_reqs)
            memory = {"base_memory_mb": engine.model.get_memory_footprint() / 2**20,
                      "float_base_memory_mb": float_engine.model.get_memory_footprint() / 2**20}  # fmt: skip
        set_threads()
        rounds = interleaved(runs, w.repeats)
        diff = max_logit_diff(engine, peft, prompts[:CHECK_ROWS], row_adapters[:CHECK_ROWS])
        bound = roofline(model_bytes(engine.model), sum(engine.adapter_bytes(ref) for ref in refs))
    tokens = batch * w.new_tokens
    base_row = {
        "label": "base (no adapters)",
        "batch": batch,
        "tok_s": rounds.tok_s("base", tokens),
        "hf_generate_tok_s": rounds.tok_s("hf", tokens),
        **rounds.vs("hf_generate", "base", "hf"),
    }
    if fx.quantize:
        base_row |= {"quantize": fx.quantize, **memory, "float_base_tok_s": rounds.tok_s("float_base", tokens),
                     **rounds.vs("float_base", "base", "float_base")}  # fmt: skip
    vs_base = rounds.vs("base", "mixed", "base")
    row = {
        "label": f"{n} adapters",
        "n_adapters": n,
        "batch": batch,
        "tok_s": rounds.tok_s("mixed", tokens),
        "base_tok_s": rounds.tok_s("base", tokens),
        "peft_tok_s": rounds.tok_s("peft", tokens),
        **vs_base,
        **rounds.vs("peft", "mixed", "peft"),
        **roofline_fields(vs_base["vs_base"], bound),
        "base_vs_hf_generate": statistics.median(rounds.ratios("base", "hf")),
        "max_abs_logit_diff": diff,
    }
    return row, base_row


def continuous(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """Continuous batching: twice a batch of requests of staggered lengths (new tokens drawn from a quarter of the
    workload's to 1.75 times it, seeded) through one engine of ``batch`` rows, so that requests end at different steps
    and the waiting ones take their rows; request i uses adapter i mod N, against the base, interleaved. Each row
    counts the batch changes of one run: every one is a new plan for which the layers prepare their adapter state."""
    w = fx.workload
    count = 2 * w.batch
    rng = random.Random(w.seed)
    high = min(w.new_tokens + 32, 7 * w.new_tokens // 4)  # within the engine's max_seq_len
    lengths = [rng.randint(max(1, w.new_tokens // 4), max(1, high)) for _ in range(count)]
    prompts = fx.prompts(count)
    runs: dict[str, Callable[[], object]] = {}
    changes: dict[str, int] = {}
    with fx.engine(max_batch=w.batch, max_resident=max(adapter_counts)) as engine:

        def run(key: str, reqs: list[Any]) -> None:
            version = engine.plan.version
            engine.generate(reqs)
            changes[key] = engine.plan.version - version

        runs["base"] = partial(run, "base", requests(prompts, [[] for _ in prompts], lengths))
        for n in adapter_counts:
            names = fx.adapters("lora", n)
            for name in names:
                engine.load_adapter(name)
            runs[str(n)] = partial(run, str(n), requests(prompts, [[names[i % n]] for i in range(count)], lengths))
        set_threads()
        rounds = interleaved(runs, w.repeats)
    rows = []
    for n in adapter_counts:
        row = {"label": f"{n} adapters, {count} requests", "n_adapters": n, "batch": w.batch, "requests": count,
               "tok_s": rounds.tok_s(str(n), sum(lengths)), "base_tok_s": rounds.tok_s("base", sum(lengths)),
               **rounds.vs("base", str(n), "base"), "batch_changes": changes[str(n)]}  # fmt: skip
        rows.append(row)
        log.info("continuous N=%d: %s", n, row)
    return rows


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
        rounds = interleaved(
            {
                "hotswap": lambda: one_by_one(engine, [[a] for a in order]),
                "base": lambda: one_by_one(engine, [[] for _ in order]),
                "peft": lambda: peft_swapping(peft),
            },
            w.repeats,
        )
        diff = max_logit_diff(engine, peft, prompts[:CHECK_ROWS], order[:CHECK_ROWS])
    tokens = w.batch * w.new_tokens
    return {
        "label": f"{n} adapters, one request at a time",
        "n_adapters": n,
        "requests": w.batch,
        "tok_s": rounds.tok_s("hotswap", tokens),
        "base_tok_s": rounds.tok_s("base", tokens),
        "peft_tok_s": rounds.tok_s("peft", tokens),
        **rounds.vs("base", "hotswap", "base"),
        **rounds.vs("peft", "hotswap", "peft"),
        "max_abs_logit_diff": diff,
    }


class _Loads(EngineObserver):
    """The engine's own split of each cold load: registry (fetch, verify ∥ read + check + cast + pack), host
    (install into the slot tables)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {"registry": [], "host": []}

    def adapter_loaded(self, source: str, seconds: float) -> None:
        self.seconds[source].append(seconds)


def load(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """Cold load from the local registry to servable (resolve, sha256 verify ∥ read + check + cast + pack, install
    into the slots) vs PEFT ``load_adapter``, one adapter each in alternating turns; then each stage of our load
    timed alone on the same adapters (what the end-to-end figure is made of)."""
    n = max(adapter_counts)
    names = fx.adapters("lora", n)
    ours, theirs = [], []
    watch = _Loads()
    with fx.engine(max_batch=1, max_resident=n, observer=watch) as engine:
        engine.unload_adapter(engine.load_adapter(names[0]))  # warm-up: first use of the code paths
        peft = fx.peft(names[:1])
        set_threads()
        for i, name in enumerate(names):  # one adapter per turn, who goes first alternating
            runs = {
                "ours": partial(engine.load_adapter, name),
                "peft": partial(peft.load_adapter, fx.artifact(name), f"cold{i}"),
            }
            ms = {k: seconds(runs[k]) * 1e3 for k in (["ours", "peft"] if i % 2 else ["peft", "ours"])}
            ours.append(ms["ours"])
            theirs.append(ms["peft"])
            peft.delete_adapter(f"cold{i}")
        stages = _load_stages(fx, names, BaseInfo.of(engine.model))
    registry_ms, install_ms = ([s * 1e3 for s in watch.seconds[k][1:]] for k in ("registry", "host"))
    return [
        {
            "label": f"LoRA r={fx.workload.rank}, {n} cold loads",
            "n_adapters": n,
            "load_ms_p50": percentile(ours, 50),
            "load_ms_p95": percentile(ours, 95),
            "peft_load_ms_p50": percentile(theirs, 50),
            "peft_load_ms_p95": percentile(theirs, 95),
            **summary("vs_peft", [p / o for o, p in zip(ours, theirs, strict=True)]),
            "registry_ms_p50": percentile(registry_ms, 50),
            "install_ms_p50": percentile(install_ms, 50),
            **{f"{stage}_ms_p50": percentile(ms, 50) for stage, ms in stages.items()},
        }
    ]


def _load_stages(fx: Fixtures, names: list[str], base: BaseInfo) -> dict[str, list[float]]:
    """Each stage of a cold load alone, per adapter (ms): verify (sha256 of every file), read (the safetensors
    file into tensors), check_cast_pack (the method's loader less the read: checks, scaling, cast, packing)."""
    stages: dict[str, list[float]] = {"verify": [], "read": [], "check_cast_pack": []}
    for name in names:
        manifest = fx.registry.resolve(name)
        path = fx.artifact(name)
        stages["verify"].append(seconds(partial(verify, path, manifest)) * 1e3)
        read = seconds(partial(read_weights, path)) * 1e3
        stages["read"].append(read)
        loader = seconds(partial(load_adapter, path, manifest.ref, manifest.method, base)) * 1e3
        stages["check_cast_pack"].append(loader - read)
    return stages


def methods(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """``mixed`` for each method (``Workload.methods``, default every one) with N distinct adapters, and one batch
    mixing them all; then on an MoE base (``Workload.moe``, unless none) LoRA on the attention and every expert, and
    on the attention alone (hotswap.bench.moe)."""
    w = fx.workload
    n = min(max(adapter_counts), w.batch)
    prompts = fx.prompts(w.batch)
    chosen = w.methods or METHODS
    per_method = {m: fx.adapters(m, n) for m in chosen}
    batches = {m: [names[i % n] for i in range(w.batch)] for m, names in per_method.items()}
    batches["all methods"] = [per_method[chosen[i % len(chosen)]][(i // len(chosen)) % n] for i in range(w.batch)]
    reqs = {label: requests(prompts, [[x] for x in a], w.new_tokens) for label, a in batches.items()}
    base_reqs = requests(prompts, [[] for _ in prompts], w.new_tokens)
    with fx.engine(max_batch=w.batch, max_resident=n * len(chosen)) as engine:
        for names in per_method.values():
            for name in names:
                engine.load_adapter(name)
        runs: dict[str, Callable[[], object]] = {"base": lambda: engine.generate(base_reqs)}
        runs |= {label: partial(engine.generate, r) for label, r in reqs.items()}
        rounds = interleaved(runs, w.repeats)
        diffs = {}
        for method in (m for m in chosen if registered()[m].peft):  # PEFT loads these; the rest: the tests
            peft = fx.peft(per_method[method][:CHECK_ROWS])
            diffs[method] = max_logit_diff(engine, peft, prompts[:CHECK_ROWS], batches[method][:CHECK_ROWS])
        base_bytes = model_bytes(engine.model)
        ref_of = {ref.partition("@")[0]: ref for ref in engine.resident()}
        bounds = {label: roofline(base_bytes, sum(engine.adapter_bytes(ref_of[a]) for a in set(adapters)))
                  for label, adapters in batches.items()}  # fmt: skip
    rows = []
    tokens = w.batch * w.new_tokens
    for label in batches:
        vs_base = rounds.vs("base", label, "base")
        rows.append(
            {
                "label": label,
                "method": label,
                "n_adapters": n,
                "tok_s": rounds.tok_s(label, tokens),
                "base_tok_s": rounds.tok_s("base", tokens),
                **vs_base,
                **roofline_fields(vs_base["vs_base"], bounds[label]),
                "max_abs_logit_diff": diffs.get(label),
            }
        )
    return rows if w.moe == "none" else rows + moe_rows(fx, n)


def decode(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """The engine's decode modes side by side (``eager``, the ``static`` step, ``compile``, and ``cuda-graphs`` on
    CUDA), one engine each: a full batch whose request i uses adapter i mod N (N = 0: the base), interleaved."""
    w = fx.workload
    modes = [m for m in DECODE_CHOICES if m != "cuda-graphs" or w.device.startswith("cuda")]
    prompts = fx.prompts(w.batch)
    rows = []
    with ExitStack() as stack:
        engines = {m: stack.enter_context(fx.engine(max_batch=w.batch, decode=m)) for m in modes}
        for n in adapter_counts:
            names = fx.adapters("lora", n) if n else []
            for engine in engines.values():
                for name in names:
                    engine.load_adapter(name)
            reqs = requests(prompts, [[names[i % n]] if n else [] for i in range(w.batch)], w.new_tokens)
            set_threads()
            rounds = interleaved({m: partial(e.generate, reqs) for m, e in engines.items()}, w.repeats)
            tokens = {m: [r.token_ids for r in e.generate(reqs)] for m, e in engines.items()}
            row: dict[str, Any] = {"label": f"{n} adapters" if n else "base", "n_adapters": n, "batch": w.batch}
            for m in modes:
                field = m.replace("-", "_")
                row[f"{field}_tok_s"] = rounds.tok_s(m, w.batch * w.new_tokens)
                if m != "eager":
                    row |= rounds.vs(field, m, "eager")
            row["same_tokens"] = all(t == tokens["eager"] for t in tokens.values())
            rows.append(row)
            log.info("decode N=%d: %s", n, row)
    return rows


def server(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """``mixed`` through ``hotswap serve`` (its own process) with one streaming client per row on 127.0.0.1, vs the
    same batch on an in-process engine; TTFT and inter-token latency seen by clients. The clients are gRPC's, and
    with ``--api http`` also the ``openai`` package's on the OpenAI-compatible API, in the same interleaved run."""
    w = fx.workload
    n = max(adapter_counts)
    batch = max(w.batch, n)
    names = fx.adapters("lora", n)
    prompts = fx.prompts(batch)
    row_adapters = [names[i % n] for i in range(batch)]
    apis = ["grpc", "http"] if w.api == "http" else ["grpc"]
    latencies: dict[str, dict[str, list[tuple[float, list[float]]]]] = {a: {name: [] for name in names} for a in apis}
    with served(fx, batch, n, http=w.api == "http") as (target, url), fx.engine(max_batch=batch) as engine:
        clients = [Client(target, timeout=600) for _ in range(batch)]
        for name in names:
            clients[0].load(name)
            engine.load_adapter(name)
        streams = {"grpc": [_grpc_stream(c, w.new_tokens) for c in clients]}
        if url is not None:
            streams["http"] = [_http_stream(url, w.new_tokens) for _ in range(batch)]
        runs: dict[str, Callable[[], object]] = {
            "engine": lambda: engine.generate(requests(prompts, [[a] for a in row_adapters], w.new_tokens))
        }
        for api, starts in streams.items():
            runs[api] = partial(stream_rows, starts, prompts, row_adapters, w.new_tokens, latencies[api])
        rounds = interleaved(runs, w.repeats)
        for c in clients:
            c.close()
    tokens = batch * w.new_tokens
    rows = []
    for api in apis:
        ttft = [t for runs in latencies[api].values() for t, _ in runs]
        itl = [gap for runs in latencies[api].values() for _, gaps in runs for gap in gaps]
        rows.append(
            {
                "label": f"{n} adapters, {batch} streaming clients",
                "api": api,
                "n_adapters": n,
                "batch": batch,
                "tok_s": rounds.tok_s(api, tokens),
                "engine_tok_s": rounds.tok_s("engine", tokens),
                **rounds.vs("engine", api, "engine"),
                "ttft_ms_p50": percentile(ttft, 50) * 1e3,
                "ttft_ms_p95": percentile(ttft, 95) * 1e3,
                "itl_ms_p50": percentile(itl, 50) * 1e3,
                "itl_ms_p95": percentile(itl, 95) * 1e3,
            }
        )
    for api in apis:
        for name, runs in latencies[api].items():
            gaps = [g for _, gs in runs for g in gs]
            rows.append(
                {
                    "label": f"adapter {name}",
                    "api": api,
                    "ttft_ms_p50": percentile([t for t, _ in runs], 50) * 1e3,
                    "ttft_ms_p95": percentile([t for t, _ in runs], 95) * 1e3,
                    "itl_ms_p50": percentile(gaps, 50) * 1e3,
                    "itl_ms_p95": percentile(gaps, 95) * 1e3,
                }
            )
    return rows


@contextmanager
def served(fx: Fixtures, max_batch: int, max_resident: int, http: bool = False) -> Iterator[tuple[str, str | None]]:
    """``hotswap serve`` in a subprocess on free ports of 127.0.0.1; yields its gRPC address and, with ``http``,
    the OpenAI-compatible API's base URL (``http://127.0.0.1:PORT/v1``)."""
    w = fx.workload
    cmd = [
        sys.executable, "-m", "hotswap.cli", "--registry", str(fx.registry.url), "serve", "--base", str(fx.base),
        "--port", "0", "--metrics-port", "0", "--no-auth", "--max-batch", str(max_batch), "--max-resident",
        str(max(max_resident, 1)), "--max-seq-len", str(w.prompt + w.new_tokens + 32), "--device", w.device,
        "--log-level", "warning", *(["--http-port", "0"] if http else []),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r" on (\S+:\d+)", line)
        api = re.search(r"OpenAI API (http://\S+/v1)", line)
        if match is None or (http and api is None):
            raise RuntimeError(f"hotswap serve did not start (exit {proc.poll()}): {line!r}")
        yield match.group(1), api.group(1) if api else None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


Stream = Callable[[list[int], str], Iterator[int]]  # starts one row's stream; yields each chunk's token count


def _grpc_stream(client: Client, new_tokens: int) -> Stream:
    def start(prompt: list[int], adapter: str) -> Iterator[int]:
        for chunk in client.stream(prompt_ids=prompt, adapters=[adapter], max_new_tokens=new_tokens, ignore_eos=True):
            yield len(chunk.token_ids)

    return start


def _http_stream(url: str, new_tokens: int) -> Stream:
    """One ``openai`` client (its own connection pool) streaming completions from the OpenAI-compatible API."""
    try:
        from openai import OpenAI
    except ImportError as e:
        raise InvalidArgument(f"--api http runs the openai package's client: pip install openai ({e})") from None
    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def start(prompt: list[int], adapter: str) -> Iterator[int]:
        stream = client.completions.create(
            model=adapter, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        for chunk in stream:
            tokens = len(chunk.choices[0].token_ids) if chunk.choices else 0  # type: ignore[attr-defined]
            if tokens:
                yield tokens

    return start


def stream_all(
    clients: list[Client],
    prompts: list[list[int]],
    adapters: list[str],
    new_tokens: int,
    latencies: dict[str, list[tuple[float, list[float]]]],
) -> None:
    """All rows at once, one streaming gRPC client each; records (TTFT, inter-token gaps) per adapter."""
    stream_rows([_grpc_stream(c, new_tokens) for c in clients], prompts, adapters, new_tokens, latencies)


def stream_rows(
    starts: list[Stream],
    prompts: list[list[int]],
    adapters: list[str],
    new_tokens: int,
    latencies: dict[str, list[tuple[float, list[float]]]],
) -> None:
    """All rows at once, one stream each (``starts``, one per row); records (TTFT, gaps between chunks) per adapter
    and checks that every row got exactly ``new_tokens`` tokens."""
    start = threading.Barrier(len(starts) + 1)
    seen: list[tuple[str, float, list[float]]] = []

    def one(stream: Stream, prompt: list[int], adapter: str) -> None:
        start.wait()
        t0 = time.perf_counter()
        times, tokens = [], 0
        for n in stream(prompt, adapter):
            times.append(time.perf_counter())
            tokens += n
        if tokens != new_tokens:
            raise RuntimeError(f"a stream of {adapter} got {tokens} tokens, not {new_tokens}")
        seen.append((adapter, times[0] - t0, [b - a for a, b in itertools.pairwise(times)]))

    threads = [threading.Thread(target=one, args=a) for a in zip(starts, prompts, adapters, strict=True)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    if len(seen) != len(starts):
        raise RuntimeError(f"{len(starts) - len(seen)} streams failed; see the errors above")
    for adapter, ttft, gaps in seen:
        latencies[adapter].append((ttft, gaps))


def training(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """Peak memory and step time per training method vs full fine-tuning, and of hotswap train's Trainer path
    (fp32 and bf16) vs the hand-written loop it replaced (hotswap.bench.training), at a quarter of the
    workload's batch (full fine-tuning of W1 on a CPU is slow) and its full length."""
    w = fx.workload
    batch = max(1, w.batch // 4)
    rows = train_bench(str(fx.base), batch, w.prompt + w.new_tokens, 3, w.device, str(fx.proxy_small()))
    return [{**row, "batch": batch, "tokens": w.prompt + w.new_tokens} for row in rows]
