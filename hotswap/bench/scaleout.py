"""``hotswap bench scale-out``: Ray Serve replicas under Zipf traffic over many adapters, adapter-affinity vs
adapter-blind routing (hit rate against its ceiling, registry loads, second-half misses), and one replica
through Ray vs ``hotswap serve``."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import replace
from functools import partial
from typing import Any

import grpc

from hotswap.bench.common import Fixtures, interleaved, percentile
from hotswap.bench.scenarios import served, stream_all
from hotswap.client import MODEL_ID_KEY, Client, build_request
from hotswap.v1 import hotswap_pb2_grpc as pb_grpc

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

    from hotswap.serve import EngineConfig
    from hotswap.serve.api import scaleout
    from hotswap.serve.api.config import ServerConfig

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
        with served(fx, w.batch, SCALE_OUT_SLOTS) as (direct, _):
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
    from hotswap.serve.api import scaleout

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
    rounds = interleaved(
        {t: partial(stream_all, clients[t], prompts, adapters, new_tokens, latencies[t]) for t in clients}, repeats
    )
    for cs in clients.values():
        for c in cs:
            c.close()
    tokens = len(prompts) * new_tokens
    ttft = [t for runs in latencies[ray_target].values() for t, _ in runs]
    return {
        "tok_s": rounds.tok_s(ray_target, tokens),
        "direct_tok_s": rounds.tok_s(direct, tokens),
        **rounds.vs("direct", ray_target, direct),
        "ttft_ms_p50": percentile(ttft, 50) * 1e3,
        "ttft_ms_p95": percentile(ttft, 95) * 1e3,
    }
