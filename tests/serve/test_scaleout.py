"""Scale-out on a real local Ray instance (started here, 2 CPUs): two replicas behind Ray Serve's gRPC
proxy, routed by adapter through Ray's model multiplexing."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from hotswap.basemodel import fingerprint
from hotswap.client import MODEL_ID_KEY, Client
from hotswap.errors import (
    AdapterNotFound,
    ArtifactRejected,
    BaseModelMismatch,
    InvalidArgument,
    PermissionDenied,
    ServerUnavailable,
    Unauthenticated,
)
from hotswap.registry import Registry
from hotswap.serve import Engine, EngineConfig, Request
from hotswap.serve.api.config import ServerConfig
from hotswap.train import RandomLoraConfig, random_bitfit, random_lora, random_loras
from hotswap.v1 import hotswap_pb2 as pb
from hotswap.v1 import hotswap_pb2_grpc as pb_grpc
from tests.serve.serverutil import ACME, ADMIN, GLOBEX, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
scaleout = pytest.importorskip("hotswap.serve.api.scaleout")

pytestmark = pytest.mark.slow
ADAPTERS = [f"a{i}" for i in range(5)] + ["bias"]
PROMPTS = [[5, 17, 99, 3], [42, 7], [11, 12, 13, 14, 15], [200, 1, 2]]
LIMITS = {"max_batch": 8, "max_seq_len": 2048, "max_resident": 8}


@pytest.fixture(scope="module")
def registry(tiny_base: Path, other_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("scaleout")
    reg = Registry(d / "registry")
    fp = fingerprint(tiny_base)
    outs = {d / name: i + 1 for i, name in enumerate([*ADAPTERS[:-1], "solo"])}  # solo: the fault test's
    for path in random_loras(tiny_base, outs, RandomLoraConfig(rank=4, init_std=0.3)):
        reg.publish(path, path.name, base_fingerprint=fp)
    reg.publish(random_bitfit(tiny_base, d / "bias", seed=9, std=0.3), "bias", base_fingerprint=fp)
    reg.publish(random_bitfit(tiny_base, d / "private", seed=8), "acme/private", base_fingerprint=fp)
    elsewhere = random_bitfit(other_base, d / "elsewhere", seed=9)
    reg.publish(elsewhere, "elsewhere", base_fingerprint=fingerprint(other_base))
    broken = random_lora(tiny_base, d / "broken", RandomLoraConfig(rank=4, seed=7))  # lora_A of the wrong width
    weights = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, broken / "adapter_model.safetensors")
    reg.publish(broken, "broken", base_fingerprint=fp)  # no check: a registry that already holds a bad export
    return d / "registry"


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cluster(tiny_base: Path, registry: Path, metrics_port: int) -> Iterator[str]:
    """Ray (2 CPUs) with hotswap deployed on two replicas; yields the gRPC proxy's address."""
    scaleout.init_local_ray(
        num_cpus=2, include_dashboard=False, logging_level="ERROR", _metrics_export_port=metrics_port
    )
    config = ServerConfig(base=tiny_base, registry=str(registry), no_auth=True, engine=EngineConfig(**LIMITS))
    options = scaleout.RayOptions(replicas=2, grpc_port=free_port(), http_port=free_port(), replica_cpus=0.5)
    try:
        scaleout.start(config, options)
        yield f"127.0.0.1:{options.grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _expected(tiny_base: Path, registry: Path, requests: list[Request]) -> list[list[int]]:
    with Engine(tiny_base, registry, EngineConfig(**LIMITS)) as engine:
        return [r.token_ids for r in engine.generate(requests)]


def test_answers_equal_the_in_process_engine(cluster: str, tiny_base: Path, registry: Path) -> None:
    """Concurrent clients, six adapters and the base, through the proxy: each answer is the engine's."""
    jobs = [(adapter, prompt) for adapter in [*ADAPTERS, None] for prompt in PROMPTS[:2]]
    expected = _expected(
        tiny_base, registry, [Request(prompt_ids=p, adapters=[a] if a else [], max_new_tokens=6) for a, p in jobs]
    )

    def ask(job: tuple[str | None, list[int]]) -> list[int]:
        adapter, prompt = job
        with Client(cluster, timeout=120) as c:
            return c.generate(prompt_ids=prompt, adapters=[adapter] if adapter else [], max_new_tokens=6).token_ids

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, jobs))
    assert got == expected
    with Client(cluster, timeout=120) as c:  # streaming and a weighted list (routed by its first adapter)
        stream = c.stream(prompt_ids=PROMPTS[2], adapters=[("a1", 0.5), "bias"], max_new_tokens=5)
        tokens = [t for chunk in stream for t in chunk.token_ids]
    (want,) = _expected(
        tiny_base, registry, [Request(prompt_ids=PROMPTS[2], adapters=[("a1", 0.5), "bias"], max_new_tokens=5)]
    )
    assert tokens == want and stream.response is not None and stream.response.token_ids == want


def _ask_raw(stub: pb_grpc.InferenceStub, adapter: str) -> tuple[str, int]:
    """(replica, adapter loads on it so far) from the trailing metadata of one Generate."""
    request = pb.GenerateRequest(prompt_ids=PROMPTS[0], adapters=[pb.WeightedAdapter(ref=adapter)], max_new_tokens=2)
    _, call = stub.Generate.with_call(request, metadata=((MODEL_ID_KEY, adapter),), timeout=120)
    trailing = dict(call.trailing_metadata())
    return trailing[scaleout.REPLICA_KEY], int(trailing[scaleout.LOADS_KEY])


def test_requests_follow_their_adapter(cluster: str) -> None:
    """After warm-up, every request lands on a replica already holding its adapter: no replica loads again."""
    with grpc.insecure_channel(cluster) as channel:
        stub = pb_grpc.InferenceStub(channel)
        loads: dict[str, int] = {}
        # warm-up: each adapter loaded somewhere (maybe already, by the test above), repeated until a round loads
        # nothing, since replicas report what they hold to Ray's routers asynchronously (a fixed second was not
        # always enough on a loaded 2-core machine)
        deadline = time.monotonic() + 30
        while True:
            before = dict(loads)
            for adapter in ADAPTERS:
                replica, n = _ask_raw(stub, adapter)
                loads[replica] = n
            if loads == before or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        warm = dict(loads)
        for _ in range(4):
            for adapter in ADAPTERS:
                replica, n = _ask_raw(stub, adapter)
                loads[replica] = n
    assert loads == warm, "a repeated adapter was loaded again"
    assert sum(loads.values()) <= 2 * len(ADAPTERS)


def test_reflection_lists_the_api(cluster: str) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(cluster) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"hotswap.v1.Inference", "hotswap.v1.Adapters", "grpc.health.v1.Health"} <= services


def test_bad_input_gets_the_single_server_status(cluster: str) -> None:
    with Client(cluster, timeout=120) as c:
        with pytest.raises(AdapterNotFound, match="nope"):
            c.generate(prompt_ids=[1, 2], adapters=["nope"])
        with pytest.raises(BaseModelMismatch):
            c.generate(prompt_ids=[1, 2], adapters=["elsewhere"])
        with pytest.raises(InvalidArgument, match="outside the vocabulary"):
            c.generate(prompt_ids=[10_000], adapters=["a0"])
        assert len(c.generate(prompt_ids=[1, 2], adapters=["a0"], max_new_tokens=2).token_ids) == 2  # still serving
    with grpc.insecure_channel(cluster) as channel:  # a routing id that is not the first adapter
        request = pb.GenerateRequest(prompt_ids=[1, 2], adapters=[pb.WeightedAdapter(ref="a0")])
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(channel).Generate(request, metadata=((MODEL_ID_KEY, "a1"),), timeout=120)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_one_requests_fault_stays_its_own(cluster: str, tiny_base: Path, registry: Path) -> None:
    """The replica core is the single server's: bad numbers and a broken stored adapter are refused with
    their own statuses while a stream in flight on the same replicas finishes with its solo tokens; and the
    Ray that hotswap started keeps its node on loopback."""
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    canary = Request(prompt_ids=PROMPTS[1], adapters=["a2"], max_new_tokens=40, ignore_eos=True)
    (want,) = _expected(tiny_base, registry, [canary])
    with Client(cluster, timeout=120) as c:
        stream = c.stream(prompt_ids=PROMPTS[1], adapters=["a2"], max_new_tokens=40, ignore_eos=True)
        chunks = iter(stream)
        tokens = list(next(chunks).token_ids)
        with pytest.raises(InvalidArgument, match="temperature must be a finite number"):
            c.generate(prompt_ids=[1, 2], adapters=["a2"], temperature=float("nan"))
        with pytest.raises(InvalidArgument, match="adapter weight for a2@1 must be a finite number"):
            c.generate(prompt_ids=[1, 2], adapters=[("a2", -1e300)])
        with pytest.raises(ArtifactRejected, match=r"broken@1: tensor .*lora_A.weight has shape"):
            c.generate(prompt_ids=[1, 2], adapters=["broken"])
        tokens += [t for chunk in chunks for t in chunk.token_ids]
    assert tokens == want


def _replica_actor(replica_id: str) -> object:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica_id in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def test_a_killed_replica_fails_its_requests_cleanly(cluster: str, tiny_base: Path, registry: Path) -> None:
    """In-flight requests on a killed replica end with an error, never a wrong answer; later ones succeed."""
    before = {name: [m.to_json() for m in Registry(registry).versions(name)] for name in Registry(registry).names()}
    with grpc.insecure_channel(cluster) as channel:  # "solo" is loaded on one replica only: the victim
        victim, _ = _ask_raw(pb_grpc.InferenceStub(channel), "solo")
    time.sleep(1)  # until the routers know where it is
    with Client(cluster, timeout=120) as c:
        stream = c.stream(prompt_ids=PROMPTS[0], adapters=["solo"], max_new_tokens=2000, ignore_eos=True)
        chunks = iter(stream)
        got = [t for _ in range(3) for t in next(chunks).token_ids]
        ray.kill(_replica_actor(victim))
        with pytest.raises(ServerUnavailable, match="replica serving this request died"):
            got += [t for chunk in chunks for t in chunk.token_ids]
        assert stream.response is None and len(got) < 2000
        # later requests are answered (by the surviving replica, or the restarted one), correctly
        answer = c.generate(prompt_ids=PROMPTS[0], adapters=["solo"], max_new_tokens=6).token_ids
    (want,) = _expected(tiny_base, registry, [Request(prompt_ids=PROMPTS[0], adapters=["solo"], max_new_tokens=6)])
    assert answer == want
    after = {name: [m.to_json() for m in Registry(registry).versions(name)] for name in Registry(registry).names()}
    assert after == before
    deadline = time.monotonic() + 120  # Ray replaces the dead replica
    while _running_replicas() != 2 or any(victim in a["name"] for a in ray.util.list_named_actors(True)):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)


def _running_replicas() -> int:
    deployment = serve.status().applications[scaleout.APP].deployments["HotswapReplica"]
    return deployment.replica_states.get("RUNNING", 0)


REQUESTS_SERIES = ("ray_hotswap_requests", "ray_hotswap_requests_total")


def test_per_adapter_metrics_through_ray(cluster: str, metrics_port: int) -> None:
    """The server's series, with a replica label, on Ray's metrics endpoint. Each replica exports every few
    seconds on its own, and the requests may have been served by more than one replica (Ray learns where
    an adapter lives asynchronously): wait until every replica's count has arrived."""
    with Client(cluster, timeout=120) as c:
        for _ in range(3):
            c.generate(prompt_ids=PROMPTS[1], adapters=["a3"], max_new_tokens=4, ignore_eos=True)
    deadline = time.monotonic() + 90
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        ok = [s for s in samples if s.name in REQUESTS_SERIES and s.labels.get("adapter") == "a3@1"]
        served = sum(s.value for s in ok if s.labels.get("status") == "ok")
        if served >= 3 and any(s.name.startswith("ray_hotswap_time_to_first_token_seconds") for s in samples):
            break
        assert time.monotonic() < deadline, f"Ray's metrics endpoint shows {served} of the 3 requests after 90 s"
        time.sleep(2)
    assert all(s.labels.get("replica") for s in ok)
    loads = [s for s in samples if s.name.startswith("ray_hotswap_adapter_load_seconds_count")]
    assert loads and all(s.labels.get("replica") for s in loads)  # loads per replica: the routing figures


def test_tenants_health_and_admin_calls(cluster: str, tiny_base: Path, registry: Path, tokens_file: Path) -> None:
    """A second application with bearer tokens (1 replica keeping 2 adapters): tenants, roles, health and the
    Adapters service behave as on a single server; Unload and pinning are refused (Ray's multiplexing owns
    residency, and its LRU eviction unloads from the engine)."""
    config = ServerConfig(base=tiny_base, registry=str(registry), auth=tokens_file, engine=EngineConfig(**LIMITS))
    options = scaleout.RayOptions(app="hotswap-auth", replicas=1, replica_cpus=0.5, adapters_per_replica=2)
    serve.run(scaleout.deployment(config, options).bind(config), name=options.app, route_prefix="/hotswap-auth")
    try:
        ask = {"prompt_ids": [1, 2], "max_new_tokens": 2}
        with Client(cluster, token=ACME, timeout=120, application=options.app) as c:
            assert len(c.generate(adapters=["acme/private"], **ask).token_ids) == 2
            assert {a.name for a in c.list()} >= {"acme/private", "a0"}
            assert c.describe("acme/private")["ref"] == "acme/private@1"
            assert c.health() == "SERVING"
            with pytest.raises(PermissionDenied, match="admin"):
                c.load("a0")
        with Client(cluster, token=GLOBEX, timeout=120, application=options.app) as c:
            with pytest.raises(PermissionDenied, match="tenant acme"):
                c.generate(adapters=["acme/private"], **ask)
            assert "acme/private" not in {a.name for a in c.list()}
        with Client(cluster, timeout=120, application=options.app) as c, pytest.raises(Unauthenticated):
            c.generate(adapters=["a0"], **ask)
        with Client(cluster, token=ADMIN, timeout=120, application=options.app) as c:
            ref, _ = c.load("a2")
            assert ref == "a2@1" and c.describe("a2")["resident"]  # one replica: the one that loaded it
            with pytest.raises(InvalidArgument, match="not available with --ray"):
                c.unload("a2")
            with pytest.raises(InvalidArgument, match="pinning"):
                c.load("a2", pin=True)
            c.load("a3")
            c.load("a4")  # a third adapter on a replica keeping 2: Ray's LRU unloads a2 from the engine
            deadline = time.monotonic() + 30
            while c.describe("a2")["resident"]:  # the unload drains first (here: nothing running)
                assert time.monotonic() < deadline, "Ray's eviction did not unload a2"
                time.sleep(0.2)
            assert c.describe("a4")["resident"]
    finally:
        serve.delete(options.app)
