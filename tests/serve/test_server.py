"""The gRPC server end to end: a real server on 127.0.0.1 (free port), real grpc clients.

One module-scoped server with auth serves most tests; tests that need other limits (a batch of one,
a queue of one, TLS, a subprocess for SIGTERM) start their own small one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotswap.client import Client
from hotswap.errors import (
    AdapterNotFound,
    BaseModelMismatch,
    CapacityExceeded,
    DeadlineExceeded,
    HotswapError,
    IntegrityError,
    InvalidAdapterRef,
    InvalidArgument,
    PermissionDenied,
    ServerUnavailable,
    Unauthenticated,
)
from hotswap.serve import Engine, EngineConfig, Request
from hotswap.serve.api.config import ServerConfig
from hotswap.serve.api.server import Server
from tests.serve.serverutil import ACME, ADMIN, GLOBEX, PROMPT, client, make_server, scrape, self_signed_cert, wait_idle

# -- correctness ----------------------------------------------------------------------------------
CASES = [
    [],
    ["math"],
    ["acme/tone"],
    ["acme/shared"],
    [("math", 1.0), ("acme/tone", 0.5)],
    ["math@1"],
]


def test_concurrent_clients_get_the_engines_output(server: Server, text_base: Path, server_registry: Path) -> None:
    with Engine(text_base, server_registry, max_batch=8, max_seq_len=256) as engine:
        expected = [
            engine.generate([Request(prompt=PROMPT, adapters=list(a), max_new_tokens=12, ignore_eos=True)])[0]
            for a in CASES
        ]
    got: dict[int, object] = {}
    streamed: dict[int, object] = {}

    def run(i: int) -> None:
        with client(server) as c:
            got[i] = c.generate(PROMPT, adapters=CASES[i], max_new_tokens=12, ignore_eos=True)
            stream = c.stream(PROMPT, adapters=CASES[i], max_new_tokens=12, ignore_eos=True)
            chunks = list(stream)
            streamed[i] = (chunks, stream.response)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(len(CASES)))
    for i, exp in enumerate(expected):
        res = got[i]
        assert res.token_ids == exp.token_ids, CASES[i]  # type: ignore[attr-defined]
        assert res.text == exp.text and res.finish_reason == "length"  # type: ignore[attr-defined]
        assert res.completion_tokens == 12 and res.prompt_tokens == exp.prompt_tokens  # type: ignore[attr-defined]
        chunks, final = streamed[i]  # type: ignore[misc]
        assert [t for ch in chunks for t in ch.token_ids] == exp.token_ids
        assert "".join(ch.text for ch in chunks) == exp.text == final.text
        assert final.token_ids == exp.token_ids
    # aliases and bare names resolve to the exact version, reported back
    assert got[1].adapters == [("math@1", 1.0)]  # type: ignore[attr-defined]
    assert got[4].adapters == [("math@1", 1.0), ("acme/tone@1", 0.5)]  # type: ignore[attr-defined]


def test_stream_holds_back_stop_strings(server: Server) -> None:
    with client(server) as c:
        full = c.generate(PROMPT, adapters=["math"], max_new_tokens=12, ignore_eos=True)
        assert len(full.text) > 6
        stop = full.text[4:7]
        cut = full.text.split(stop, 1)[0]
        stream = c.stream(PROMPT, adapters=["math"], max_new_tokens=12, ignore_eos=True, stop=[stop])
        chunks = list(stream)
    assert stream.response is not None and stream.response.finish_reason == "stop"
    assert stream.response.text == cut
    assert "".join(ch.text for ch in chunks) == cut  # the stop string never reached the client


def test_prompt_ids_and_sampling_params(server: Server) -> None:
    with client(server) as c:
        a = c.generate(prompt_ids=[101, 2000, 3000], adapters=["math"], max_new_tokens=6, temperature=0.9,
                       top_k=50, top_p=0.9, seed=7, ignore_eos=True)  # fmt: skip
        b = c.generate(prompt_ids=[101, 2000, 3000], adapters=["math"], max_new_tokens=6, temperature=0.9,
                       top_k=50, top_p=0.9, seed=7, ignore_eos=True)  # fmt: skip
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6 and a.prompt_tokens == 3


# -- errors ---------------------------------------------------------------------------------------
ERROR_CASES = [
    # (token, params, error class, gRPC code, words the message must contain)
    (ACME, {"adapters": ["../etc"]}, InvalidAdapterRef, "INVALID_ARGUMENT", "invalid adapter reference"),
    (ACME, {"adapters": ["math"], "max_new_tokens": 0}, InvalidArgument, "INVALID_ARGUMENT", "max_new_tokens"),
    (ACME, {"prompt_ids": list(range(1, 300))}, InvalidArgument, "INVALID_ARGUMENT", "max_seq_len"),
    (ACME, {"prompt": "x", "prompt_ids": [5]}, InvalidArgument, "INVALID_ARGUMENT", "exactly one"),
    (ACME, {"adapters": ["math"], "rank": 2}, InvalidArgument, "INVALID_ARGUMENT", "DyLoRA"),
    (ACME, {"adapters": [("math", float("nan"))]}, InvalidArgument, "INVALID_ARGUMENT", "finite"),
    (ACME, {"adapters": ["nope"]}, AdapterNotFound, "NOT_FOUND", "nope"),
    (ACME, {"adapters": ["math@9"]}, AdapterNotFound, "NOT_FOUND", "math"),
    (ACME, {"adapters": ["math:prod"]}, AdapterNotFound, "NOT_FOUND", "prod"),
    (ACME, {"adapters": ["elsewhere"]}, BaseModelMismatch, "FAILED_PRECONDITION", "base"),
    (ACME, {"adapters": ["corrupt"]}, IntegrityError, "FAILED_PRECONDITION", "sha256"),
    (None, {"adapters": ["math"]}, Unauthenticated, "UNAUTHENTICATED", "Bearer"),
    ("wrong-token", {"adapters": ["math"]}, Unauthenticated, "UNAUTHENTICATED", "unknown token"),
    (ACME, {"adapters": ["globex/secret"]}, PermissionDenied, "PERMISSION_DENIED", "tenant globex"),
    (ACME, {"adapters": ["globex/nothing-here"]}, PermissionDenied, "PERMISSION_DENIED", "tenant globex"),
    (GLOBEX, {"adapters": ["acme/tone"]}, PermissionDenied, "PERMISSION_DENIED", "tenant acme"),
]


@pytest.mark.parametrize(("token", "params", "error", "code", "words"), ERROR_CASES)
def test_status_codes(server: Server, token: str | None, params: dict, error: type, code: str, words: str) -> None:
    params = {"prompt": PROMPT, **params} if "prompt_ids" not in params else params
    prompt = params.pop("prompt", None)
    with client(server, token) as c:
        with pytest.raises(error, match=words) as info:
            c.generate(prompt, **params)
        assert type(info.value) is error  # the exact class travels in trailing metadata
        # the same over a raw channel: the gRPC status code itself
        raw = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        from hotswap.client import build_request

        call = raw.unary_unary(
            "/hotswap.v1.Inference/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        with pytest.raises(grpc.RpcError) as rpc:
            call(build_request(prompt, **params), metadata=metadata, timeout=30)
        assert rpc.value.code().name == code  # type: ignore[attr-defined]
        raw.close()
        # and the server keeps serving
        ok = client(server).generate(PROMPT, adapters=["math"], max_new_tokens=2)
        assert ok.completion_tokens >= 1


def test_foreign_names_do_not_leak(server: Server) -> None:
    """Another tenant's existing private adapter and a name it never published look the same."""
    with client(server, ACME) as c:
        messages = []
        for ref in ("globex/secret", "globex/nothing-here"):
            with pytest.raises(PermissionDenied) as info:
                c.generate(PROMPT, adapters=[ref])
            messages.append(str(info.value).replace("nothing-here", "secret"))
            with pytest.raises(PermissionDenied):
                c.describe(ref)
    assert messages[0] == messages[1]


def test_tenants_list_describe_and_admin(server: Server) -> None:
    with client(server, ACME) as acme, client(server, GLOBEX) as globex, client(server, ADMIN) as admin:
        acme_names = {a.name for a in acme.list()}
        globex_names = {a.name for a in globex.list()}
        admin_names = {a.name for a in admin.list()}
        assert {"math", "acme/tone", "acme/shared"} <= acme_names and "globex/secret" not in acme_names
        assert "globex/secret" in globex_names and "acme/tone" not in globex_names
        assert "acme/shared" in globex_names  # public tenant adapter: for everyone
        assert {"acme/tone", "globex/secret", "math"} <= admin_names
        assert acme.describe("acme/tone")["method"] == "dora"
        assert globex.describe("globex/secret")["ref"] == "globex/secret@1"
        # the tenant's own private adapter works for it
        assert globex.generate(PROMPT, adapters=["globex/secret"], max_new_tokens=3).completion_tokens >= 1
        # admin RPCs need the admin role
        for call in (lambda: acme.load("math"), lambda: acme.unload("math")):
            with pytest.raises(PermissionDenied, match="admin"):
                call()
        ref, seconds = admin.load("long", pin=True)
        assert ref == "long@1" and seconds >= 0
        info = {a.name: a for a in admin.list()}["long"]
        assert info.resident == ["long@1"] and info.versions == [1]
        assert admin.describe("long")["resident"] is True
        assert admin.unload("long") == "long@1"
        assert admin.describe("long")["resident"] is False
        with pytest.raises(AdapterNotFound):
            admin.load("nope")


# -- limits, deadlines, cancellation, shutdown ----------------------------------------------------
@pytest.fixture
def one_slot(text_base: Path, server_registry: Path) -> Iterator[Server]:
    """A server with one batch row and a queue of one, no auth."""
    srv = make_server(text_base, server_registry, max_batch=1, max_queue=1, max_seq_len=4096).start()
    yield srv
    srv.stop(grace=1)


LONG = {"adapters": ["math"], "max_new_tokens": 4000, "ignore_eos": True}


def test_deadline_and_cancel_free_the_slot(one_slot: Server) -> None:
    with client(one_slot, None) as c:
        with pytest.raises(DeadlineExceeded):
            c.generate(PROMPT, timeout=0.5, **LONG)
        wait_idle(one_slot)  # the row left the batch long before 4000 tokens
        stream = c.stream(PROMPT, **LONG)
        it = iter(stream)
        next(it)
        stream.cancel()
        wait_idle(one_slot)
        assert c.generate(PROMPT, adapters=["math"], max_new_tokens=3, ignore_eos=True).completion_tokens == 3
    m = scrape(one_slot)
    grpc = ("api", "grpc")
    assert m[("hotswap_requests_total", (("adapter", "math@1"), grpc, ("status", "deadline_exceeded")))] == 1
    assert m[("hotswap_requests_total", (("adapter", "math@1"), grpc, ("status", "cancelled")))] == 1
    assert m[("hotswap_generated_tokens_total", (("adapter", "math@1"), grpc))] < 1000


def test_full_queue_is_resource_exhausted_and_recovers(one_slot: Server) -> None:
    with client(one_slot, None) as c:
        running = c.stream(PROMPT, **LONG)
        it = iter(running)
        next(it)  # admitted: it holds the only row
        waiting = c.stream(PROMPT, **LONG)
        waiting_it = iter(waiting)
        end = time.monotonic() + 30
        while one_slot.engine.counts() != (1, 1):  # type: ignore[union-attr]
            assert time.monotonic() < end
            time.sleep(0.01)
        with pytest.raises(CapacityExceeded, match="queue is full"):
            c.generate(PROMPT, adapters=["math"], max_new_tokens=2)
        running.cancel()
        next(waiting_it)  # the waiting one moved into the freed row
        waiting.cancel()
        wait_idle(one_slot)
        assert c.generate(PROMPT, adapters=["math"], max_new_tokens=2, ignore_eos=True).completion_tokens == 2


def test_health_and_unavailable_until_loaded(text_base: Path, server_registry: Path) -> None:
    srv = make_server(text_base, server_registry).open()
    try:
        with client(srv, None) as c:
            assert c.health() == "NOT_SERVING"
            assert c.health("hotswap.v1.Inference") == "NOT_SERVING"
            with pytest.raises(ServerUnavailable, match="loading"):
                c.generate(PROMPT)
            srv.load()
            assert c.health() == "SERVING" and c.health("hotswap.v1.Adapters") == "SERVING"
            assert c.generate(PROMPT, max_new_tokens=2, ignore_eos=True).completion_tokens == 2
    finally:
        srv.stop(grace=1)
    with pytest.raises(ServerUnavailable):
        Client(f"127.0.0.1:{srv.port}", timeout=2).generate(PROMPT)  # nobody listens any more


def test_stop_drains_in_flight_and_refuses_new(text_base: Path, server_registry: Path) -> None:
    srv = make_server(text_base, server_registry, max_batch=2, max_seq_len=2048).start()
    c = client(srv, None)
    watch = health_pb2_grpc.HealthStub(c.channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    # two requests in flight keep the drain busy; both have streamed a token, so both reached the server
    streams = [c.stream(PROMPT, adapters=["math"], max_new_tokens=400, ignore_eos=True) for _ in range(2)]
    firsts = [next(iter(s)) for s in streams]
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 120})
    stopper.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # pushed as the drain starts
    with pytest.raises(ServerUnavailable, match="shutting down"):
        c.generate(PROMPT, max_new_tokens=2)
    for first, stream in zip(firsts, streams, strict=True):  # the in-flight requests run to the end
        assert len(first.token_ids) + sum(len(ch.token_ids) for ch in stream) == 400
    stopper.join(timeout=60)
    assert all(s.response is not None and s.response.finish_reason == "length" for s in streams)
    c.close()


# -- metrics ----------------------------------------------------------------------------------------
def test_metrics_count_every_request(server: Server) -> None:
    before = scrape(server)
    sent = {"math@1": 3, "acme/tone@1": 2, "base": 1}
    refs = {"math@1": ["math"], "acme/tone@1": ["acme/tone:latest"], "base": []}
    with client(server) as c:
        for label, n in sent.items():
            for _ in range(n):
                c.generate(PROMPT, adapters=refs[label], max_new_tokens=4, ignore_eos=True)
        with pytest.raises(AdapterNotFound):
            c.generate(PROMPT, adapters=["nope"])
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"api": "grpc", **labels}.items())))  # the gRPC API's requests
        return after.get(key, 0.0) - before.get(key, 0.0)

    for label, n in sent.items():
        for hist in ("queue_wait", "time_to_first_token", "request_duration"):
            assert delta(f"hotswap_{hist}_seconds_count", adapter=label) == n, (hist, label)
        assert delta("hotswap_inter_token_latency_seconds_count", adapter=label) == 3 * n
        assert delta("hotswap_requests_total", adapter=label, status="ok") == n
        assert delta("hotswap_generated_tokens_total", adapter=label) == 4 * n
    assert delta("hotswap_requests_total", adapter="unresolved", status="not_found") == 1
    assert after[("hotswap_batch_size_count", ())] > before.get(("hotswap_batch_size_count", ()), 0)
    assert after[("hotswap_resident_adapters", ())] >= 2
    assert after[("hotswap_adapter_load_seconds_count", (("source", "registry"),))] >= 2
    assert after[("hotswap_adapter_cache_events_total", (("event", "hit"), ("tier", "resident")))] >= 1


def test_each_ref_resolved_once_and_bugs_are_internal(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The servicer core resolves each ref as written once (authorizing it); the engine resolves only the exact
    version it was handed. An exception no error class covers is INTERNAL with a generic message (its
    traceback in the log), and an unauthenticated call is counted like any other failure."""
    resolved: list[str] = []
    real = server.registry.resolve

    def resolve(ref: object, **kw: object) -> object:
        resolved.append(str(ref))
        return real(ref, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(server.registry, "resolve", resolve)
    with client(server, ADMIN) as c:
        c.generate(PROMPT, adapters=["math", "acme/tone:latest"], max_new_tokens=2)
        assert list(c.stream(PROMPT, adapters=["math"], max_new_tokens=2))
        assert [r for r in resolved if "@" not in r] == ["math", "acme/tone:latest", "math"]
        assert set(resolved) - {"math", "acme/tone:latest"} <= {"math@1", "acme/tone@1"}
        before = scrape(server)
        with pytest.raises(Unauthenticated):
            client(server, None).generate(PROMPT, adapters=["math"])

        def bug(refs: object) -> str:
            raise RuntimeError("a bug")

        monkeypatch.setattr(server.metrics, "adapter_label", bug)
        with pytest.raises(HotswapError, match="internal error; see the server log") as info:
            c.generate(PROMPT, adapters=["math"], max_new_tokens=2)
    assert type(info.value) is HotswapError and "a bug" not in str(info.value)
    assert any(r.message == "Generate failed" and r.exc_info for r in caplog.records)
    after = scrape(server)
    for status in ("unauthenticated", "internal"):
        key = ("hotswap_requests_total", (("adapter", "unresolved"), ("api", "grpc"), ("status", status)))
        assert after[key] - before.get(key, 0.0) == 1


def test_adapter_label_cardinality_is_capped() -> None:
    from hotswap.serve.api.metrics import Metrics

    m = Metrics(max_adapter_labels=2)
    assert [m.adapter_label(r) for r in (["a@1"], [], ["b@1"], ["a@1"])] == ["a@1", "base", "other", "a@1"]


def test_grafana_dashboard_uses_our_metrics() -> None:
    import json
    import re

    from hotswap.serve.api.metrics import Metrics

    names = {s.name for family in Metrics().registry.collect() for s in family.samples} | {
        f.name for f in Metrics().registry.collect()
    }
    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "hotswap.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"hotswap_[a-z_]+", e)}
    assert len(exprs) >= 8 and used
    for metric in used:
        base = re.sub(r"_(bucket|count|sum|total)$", "", metric)
        assert metric in names or base in names, metric


# -- generic clients -------------------------------------------------------------------------------
def test_reflection_built_client_calls_generate(server: Server) -> None:
    """No generated stubs: the request type comes from the server's reflection service."""
    from google.protobuf import descriptor_pool, json_format
    from google.protobuf.message_factory import GetMessageClass
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    db = ProtoReflectionDescriptorDatabase(channel)
    assert "hotswap.v1.Inference" in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("hotswap.v1.Inference").FindMethodByName("Generate")
    request_cls = GetMessageClass(method.input_type)
    response_cls = GetMessageClass(method.output_type)
    request = json_format.ParseDict(
        {"prompt": PROMPT, "adapters": [{"ref": "math"}], "maxNewTokens": 5, "ignoreEos": True}, request_cls()
    )
    call = channel.unary_unary(
        "/hotswap.v1.Inference/Generate",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    response = call(request, metadata=(("authorization", f"Bearer {ACME}"),), timeout=30)
    expected = client(server).generate(PROMPT, adapters=["math"], max_new_tokens=5, ignore_eos=True)
    assert list(response.token_ids) == expected.token_ids and response.text == expected.text
    channel.close()


def test_tls(text_base: Path, server_registry: Path, tmp_path: Path) -> None:
    import shutil

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    key, cert = self_signed_cert(openssl, tmp_path)
    config = ServerConfig(
        base=text_base, registry=str(server_registry), port=0, metrics_port=None, no_auth=True,
        tls_cert=cert, tls_key=key, engine=EngineConfig(max_batch=2, max_seq_len=128),
    )  # fmt: skip
    srv = Server(config).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", tls_ca=cert, timeout=30) as c:
            assert c.generate(PROMPT, adapters=["math"], max_new_tokens=3, ignore_eos=True).completion_tokens == 3
        with pytest.raises(HotswapError), Client(f"127.0.0.1:{srv.port}", timeout=5) as plain:
            plain.generate(PROMPT)  # plaintext to a TLS port never gets an answer
    finally:
        srv.stop(grace=1)


def test_config_needs_an_explicit_auth_choice(text_base: Path, tokens_file: Path) -> None:
    with pytest.raises(InvalidArgument, match="--no-auth"):
        ServerConfig(base=text_base, registry="x")
    with pytest.raises(InvalidArgument, match="--no-auth"):
        ServerConfig(base=text_base, registry="x", auth=tokens_file, no_auth=True)
