"""The benchmark scenarios of shared/BENCHMARK.md. Each returns rows whose ratios come from one run."""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import grpc

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
from hotswap.bench.soak import soak
from hotswap.bench.training import train_bench
from hotswap.client import MODEL_ID_KEY, Client, build_request
from hotswap.methods import registered
from hotswap.v1 import hotswap_pb2_grpc as pb_grpc

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
        for method in (m for m in METHODS if registered()[m].peft):  # PEFT loads these; the rest: the tests
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


def server(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """``mixed`` through ``hotswap serve`` (its own process) with one streaming gRPC client per row on
    127.0.0.1, vs the same batch on an in-process engine; TTFT and inter-token latency seen by clients."""
    w = fx.workload
    n = max(adapter_counts)
    batch = max(w.batch, n)
    names = fx.adapters("lora", n)
    prompts = fx.prompts(batch)
    row_adapters = [names[i % n] for i in range(batch)]
    latencies: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in names}
    with _served(fx, batch, n) as target, fx.engine(max_batch=batch) as engine:
        clients = [Client(target, timeout=600) for _ in range(batch)]
        for name in names:
            clients[0].load(name)
            engine.load_adapter(name)
        seconds = _interleaved(
            {
                "engine": lambda: engine.generate(requests(prompts, [[a] for a in row_adapters], w.new_tokens)),
                "grpc": lambda: _stream_all(clients, prompts, row_adapters, w.new_tokens, latencies),
            },
            w.repeats,
        )
        for c in clients:
            c.close()
    tok = {k: _tok_s(batch, w.new_tokens, s) for k, s in seconds.items()}
    ttft = [t for runs in latencies.values() for t, _ in runs]
    itl = [gap for runs in latencies.values() for _, gaps in runs for gap in gaps]
    rows = [
        {
            "label": f"{n} adapters, {batch} streaming clients",
            "n_adapters": n,
            "batch": batch,
            "tok_s": tok["grpc"],
            "engine_tok_s": tok["engine"],
            "vs_engine": tok["grpc"] / tok["engine"],
            "ttft_ms_p50": percentile(ttft, 50) * 1e3,
            "ttft_ms_p95": percentile(ttft, 95) * 1e3,
            "itl_ms_p50": percentile(itl, 50) * 1e3,
            "itl_ms_p95": percentile(itl, 95) * 1e3,
        }
    ]
    for name, runs in latencies.items():
        gaps = [g for _, gs in runs for g in gs]
        rows.append(
            {
                "label": f"adapter {name}",
                "ttft_ms_p50": percentile([t for t, _ in runs], 50) * 1e3,
                "ttft_ms_p95": percentile([t for t, _ in runs], 95) * 1e3,
                "itl_ms_p50": percentile(gaps, 50) * 1e3,
                "itl_ms_p95": percentile(gaps, 95) * 1e3,
            }
        )
    return rows


@contextmanager
def _served(fx: Fixtures, max_batch: int, max_resident: int) -> Iterator[str]:
    """``hotswap serve`` in a subprocess on a free port of 127.0.0.1; yields its address."""
    w = fx.workload
    cmd = [
        sys.executable, "-m", "hotswap.cli", "--registry", str(fx.registry.url), "serve", "--base", str(fx.base),
        "--port", "0", "--metrics-port", "0", "--no-auth", "--max-batch", str(max_batch), "--max-resident",
        str(max(max_resident, 1)), "--max-seq-len", str(w.prompt + w.new_tokens + 32), "--device", w.device,
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r" on (\S+:\d+)", line)
        if match is None:
            raise RuntimeError(f"hotswap serve did not start (exit {proc.poll()}): {line!r}")
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def _stream_all(
    clients: list[Client],
    prompts: list[list[int]],
    adapters: list[str],
    new_tokens: int,
    latencies: dict[str, list[tuple[float, list[float]]]],
) -> None:
    """All rows at once, one streaming client each; records (TTFT, inter-token gaps) per adapter."""
    start = threading.Barrier(len(clients) + 1)
    seen: list[tuple[str, float, list[float]]] = []

    def one(client: Client, prompt: list[int], adapter: str) -> None:
        start.wait()
        t0 = time.perf_counter()
        times = []
        for _chunk in client.stream(prompt_ids=prompt, adapters=[adapter], max_new_tokens=new_tokens, ignore_eos=True):
            times.append(time.perf_counter())
        seen.append((adapter, times[0] - t0, [b - a for a, b in itertools.pairwise(times)]))

    threads = [threading.Thread(target=one, args=a) for a in zip(clients, prompts, adapters, strict=True)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    if len(seen) != len(clients):
        raise RuntimeError(f"{len(clients) - len(seen)} streams failed; see the errors above")
    for adapter, ttft, gaps in seen:
        latencies[adapter].append((ttft, gaps))


def training(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """Peak memory and step time per training method vs full fine-tuning (hotswap.bench.training), at a
    quarter of the workload's batch (full fine-tuning of W1 on a CPU is slow) and its full length."""
    w = fx.workload
    batch = max(1, w.batch // 4)
    rows = train_bench(str(fx.base), batch, w.prompt + w.new_tokens, 3, w.device, str(fx.proxy_small()))
    return [{**row, "batch": batch, "tokens": w.prompt + w.new_tokens} for row in rows]


TINY_ONLY = {"scale-out"}  # scenarios that measure routing, not FLOPs: the tiny base only
SCALE_OUT_REPLICAS = 4
SCALE_OUT_SLOTS = 16
SCALE_OUT_KEPT = 256  # adapters a replica keeps (16 resident + host RAM): tiny adapters, ~100 KB each
ZIPF_S = 1.1


def scale_out(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """Ray Serve, 4 replicas x 16 resident slots, N adapters with Zipf(1.1) popularity: adapter-affinity
    routing (Ray's model multiplexing) vs adapter-blind routing (Ray's default: each engine loads what it
    is sent) over the same replicas and request sequence; then 1 replica through Ray vs ``hotswap serve``."""
    import ray

    from hotswap.serve import EngineConfig, scaleout
    from hotswap.serve.config import ServerConfig

    w = fx.workload
    n = max(adapter_counts)
    names = fx.adapters("lora", n)
    rng = random.Random(w.seed)
    sequence = rng.choices(names, weights=[1 / (k + 1) ** ZIPF_S for k in range(n)], k=w.requests)
    prompts = fx.prompts(w.batch)
    engine = EngineConfig(max_batch=w.batch, max_resident=SCALE_OUT_SLOTS, max_seq_len=w.prompt + w.new_tokens + 32,
                          device=w.device)  # fmt: skip
    config = ServerConfig(base=fx.base, registry=str(fx.registry.url), no_auth=True, engine=engine)
    grpc_port = _free_port()
    scaleout.init_local_ray(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="ERROR")
    rows = []
    try:
        base = scaleout.RayOptions(replicas=SCALE_OUT_REPLICAS, grpc_port=grpc_port, http_port=_free_port(),
                                   replica_cpus=0, adapters_per_replica=SCALE_OUT_KEPT)  # fmt: skip
        scaleout.start(config, base)
        target = f"127.0.0.1:{grpc_port}"
        for label, routed in (("adapter-affinity (Ray multiplexing)", True), ("adapter-blind (Ray default)", False)):
            scaleout.deploy(config, replace(base, route_by_adapter=routed))
            rows.append({"label": label, "n_adapters": n, **_replay(target, sequence, prompts, w.new_tokens, w.batch)})
            ray.serve.delete(base.app)
        affinity, blind = rows
        affinity["vs_blind_loads"] = blind["registry_loads"] / max(affinity["registry_loads"], 1)
        affinity["vs_blind_misses_second_half"] = blind["misses_second_half"] / max(affinity["misses_second_half"], 1)
        scaleout.deploy(config, replace(base, replicas=1))
        with _served(fx, w.batch, SCALE_OUT_SLOTS) as direct:
            hop = _proxy_hop(target, direct, names[:4], prompts, w.new_tokens, w.repeats)
        rows.append({"label": "1 replica through Ray ÷ hotswap serve", **hop})
    finally:
        ray.serve.shutdown()
        ray.shutdown()
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replay(
    target: str, sequence: list[str], prompts: list[list[int]], new_tokens: int, clients: int
) -> dict[str, Any]:
    """Send ``sequence`` with ``clients`` concurrent streams; cache hits and loads from the replicas' trailers."""
    from hotswap.serve import scaleout

    work = iter(enumerate(sequence))
    lock = threading.Lock()
    tiers: list[str] = [""] * len(sequence)
    ttft: list[float] = []
    loads: dict[str, int] = {}

    def client() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while True:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                i, adapter = item
                request = build_request(prompt_ids=prompts[i % len(prompts)], adapters=[adapter],
                                        max_new_tokens=new_tokens, ignore_eos=True)  # fmt: skip
                t0 = time.perf_counter()
                call = stub.GenerateStream(request, metadata=((MODEL_ID_KEY, adapter),), timeout=600)
                first = None
                for _ in call:
                    first = first or time.perf_counter()
                trailers = dict(call.trailing_metadata())
                with lock:
                    ttft.append((first or time.perf_counter()) - t0)
                    tiers[i] = trailers[scaleout.CACHE_KEY]
                    replica = trailers[scaleout.REPLICA_KEY]
                    loads[replica] = max(loads.get(replica, 0), int(trailers[scaleout.LOADS_KEY]))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    half = len(tiers) // 2
    distinct = len(set(sequence))
    second = tiers[half:]
    return {
        "requests": len(sequence),
        "distinct_adapters": distinct,
        "hit_rate_ceiling": 1 - distinct / len(sequence),  # every distinct adapter's first request must load
        "hit_rate": sum(t != "registry" for t in tiers) / len(tiers),  # no registry load: resident or host RAM
        "resident_hit_rate": tiers.count("resident") / len(tiers),
        "hit_rate_second_half": sum(t != "registry" for t in second) / len(second),
        "misses_second_half": second.count("registry"),
        "registry_loads": sum(loads.values()),
        "loads_per_replica": sorted(loads.values()),
        "tok_s": len(sequence) * new_tokens / seconds,
        "ttft_ms_p50": percentile(ttft, 50) * 1e3,
        "ttft_ms_p95": percentile(ttft, 95) * 1e3,
    }


def _proxy_hop(
    ray_target: str, direct: str, names: list[str], prompts: list[list[int]], new_tokens: int, repeats: int
) -> dict[str, Any]:
    """The same streaming batch through Ray's proxy to 1 replica and straight to ``hotswap serve``."""
    clients = {t: [Client(t, timeout=600) for _ in prompts] for t in (ray_target, direct)}
    adapters = [names[i % len(names)] for i in range(len(prompts))]
    latencies: dict[str, dict[str, list[tuple[float, list[float]]]]] = {
        t: {a: [] for a in names} for t in (ray_target, direct)
    }
    seconds = _interleaved(
        {t: partial(_stream_all, clients[t], prompts, adapters, new_tokens, latencies[t]) for t in clients}, repeats
    )
    for cs in clients.values():
        for c in cs:
            c.close()
    ray_tok, direct_tok = (_tok_s(len(prompts), new_tokens, seconds[t]) for t in (ray_target, direct))
    ttft = [t for runs in latencies[ray_target].values() for t, _ in runs]
    return {
        "tok_s": ray_tok,
        "direct_tok_s": direct_tok,
        "vs_direct": ray_tok / direct_tok,
        "ttft_ms_p50": percentile(ttft, 50) * 1e3,
        "ttft_ms_p95": percentile(ttft, 95) * 1e3,
    }


SCENARIOS: dict[str, Callable[[Fixtures, list[int]], list[dict[str, Any]]]] = {
    "mixed": mixed,
    "swap": swap,
    "load": load,
    "methods": methods,
    "server": server,
    "train": training,
    "scale-out": scale_out,
    "soak": soak,
}
