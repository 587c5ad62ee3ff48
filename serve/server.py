"""The gRPC server: ``hotswap.v1`` (Inference, Adapters) over one :class:`Engine`, plus the standard health
and reflection services and Prometheus ``/metrics``.

Life cycle: :meth:`Server.open` binds the port and answers health (NOT_SERVING) and metrics at once;
:meth:`Server.load` loads the base model (Generate answers UNAVAILABLE until then) and turns SERVING;
:meth:`Server.stop` drains: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish within
the grace period, the rest are cancelled, then the engine closes.

Every error leaves through :func:`_abort`: the gRPC status from :data:`hotswap.errors.ERROR_TABLE`, a
message saying what to fix, and the error class in trailing metadata ``hotswap-error`` (the Python
client re-raises that class).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hotswap.errors import (
    GRPC_ERROR_KEY,
    DeadlineExceeded,
    HotswapError,
    PermissionDenied,
    ServerUnavailable,
    clip_message,
    mapping_for,
)
from hotswap.registry import AdapterRef, Registry
from hotswap.serve.auth import ANONYMOUS_ADMIN, Principal, TokenAuth, authorize
from hotswap.serve.config import ServerConfig
from hotswap.serve.engine import Engine, RequestHandle
from hotswap.serve.metrics import UNRESOLVED, Metrics
from hotswap.serve.types import Request, Result
from hotswap.v1 import hotswap_pb2 as pb
from hotswap.v1 import hotswap_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Inference", "Adapters"))
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def status_of(err: HotswapError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The gRPC status of ``err`` and the trailing metadata naming its class (the client re-raises it)."""
    ours = next(c for c in type(err).__mro__ if c.__module__ == HotswapError.__module__)  # not a wrapper's
    return grpc.StatusCode[mapping_for(err).grpc_status], ((GRPC_ERROR_KEY, ours.__name__),)


def _abort(context: grpc.ServicerContext, err: HotswapError) -> NoReturn:
    code, trailing = status_of(err)
    context.set_trailing_metadata(trailing)
    context.abort(code, clip_message(str(err)))  # bounded: details travel in metadata
    raise AssertionError("unreachable")  # context.abort raises


def _ended_status(context: grpc.ServicerContext) -> str:
    """Status label of an RPC the client ended (cancel or deadline) before we answered."""
    remaining = context.time_remaining()
    return "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"


class TextDeltas:
    """Turns a growing token list into text deltas for streaming, holding back any tail that could
    still become a stop string (or is half a UTF-8 character), so the deltas always concatenate to a
    prefix of the final text."""

    def __init__(self, tokenizer: object | None, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def feed(self, token: int) -> str:
        self.tokens.append(token)
        if self.tokenizer is None or self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        if any(s in text for s in self.stop):
            self.stopped = True  # the engine ends the request on this token; the final chunk has the rest
            return ""
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) : safe], text[:safe]
        return delta

    def rest(self, final_text: str) -> str:
        return final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.auth = TokenAuth.from_file(config.auth) if config.auth is not None else None
        self.registry = Registry(config.registry)
        self.metrics = Metrics(config.max_adapter_labels)
        self.engine: Engine | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._health = health.HealthServicer()
        self._grpc: grpc.Server | None = None
        self._http: object | None = None
        self._lock = threading.Condition()
        self._inflight = 0
        self._state = "starting"  # -> serving -> draining -> stopped

    # -- life cycle -----------------------------------------------------------------------------------
    def open(self) -> Server:
        """Bind and start answering: health says NOT_SERVING and Generate UNAVAILABLE until :meth:`load`."""
        cfg = self.config
        workers = cfg.engine.max_batch + cfg.engine.max_queue + 16  # the engine's queue bound is the one that bites
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hotswap-rpc"),
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_InferenceServicer_to_server(_Inference(self), server)
        pb_grpc.add_AdaptersServicer_to_server(_Adapters(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise ServerUnavailable(f"cannot listen on {address} (in use or not permitted)")
        server.start()
        self._grpc = server
        if cfg.metrics_port is not None:
            self._http, self.metrics_port = self.metrics.serve_http(cfg.host, cfg.metrics_port)
        log.info("listening on %s:%d (%s), metrics on %s", cfg.host, self.port, "TLS" if cfg.tls_cert else "plaintext",
                 f"{cfg.host}:{self.metrics_port}/metrics" if self.metrics_port else "off")  # fmt: skip
        return self

    def load(self) -> Server:
        """Load the base model into the engine and start SERVING."""
        t0 = time.perf_counter()
        self.metrics.health_listeners.append(self._engine_health)
        engine = Engine(self.config.base, self.registry, self.config.engine, observer=self.metrics)
        self.metrics.watch(
            resident=lambda: len(engine.resident()),
            queued=lambda: engine.counts()[0],
            running=lambda: engine.counts()[1],
        )
        with self._lock:
            if self._state != "starting":  # stopped while loading
                engine.close()
                raise ServerUnavailable("the server was stopped while loading")
            self.engine, self._state = engine, "serving"
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving base %s (%s) after %.1f s", self.config.base, engine.base_fingerprint[:19],
                 time.perf_counter() - t0)  # fmt: skip
        return self

    def start(self) -> Server:
        return self.open().load()

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new requests, let in-flight ones finish for ``grace`` seconds."""
        grace = self.config.grace_seconds if grace is None else grace
        with self._lock:
            if self._state in ("draining", "stopped"):
                return
            self._state = "draining"
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace
        with self._lock:
            while self._inflight and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
            left = self._inflight
        if left:
            log.warning("grace period over: cancelling %d in-flight requests", left)
        if self._grpc is not None:
            self._grpc.stop(grace=0).wait()  # cancels what is left; their callbacks cancel the engine rows
        if self.engine is not None:
            self.engine.close()
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
        with self._lock:
            self._state = "stopped"
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the gRPC server terminates (e.g. after :meth:`stop` from another thread)."""
        assert self._grpc is not None, "open() first"
        return self._grpc.wait_for_termination(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _engine_health(self, healthy: bool) -> None:
        """The engine's steps keep failing (NOT_SERVING, so balancers move traffic) or work again."""
        with self._lock:
            if self._state != "serving":
                return
        status = health_pb2.HealthCheckResponse
        self._set_health(status.SERVING if healthy else status.NOT_SERVING)

    def _set_health(self, status: int) -> None:
        for service in ("", *SERVICES):
            self._health.set(service, status)

    # -- helpers for the servicers ------------------------------------------------------------------------
    def enter(self, context: grpc.ServicerContext, needs_engine: bool = True) -> Principal:
        """Admit an RPC: the server must be serving, the caller authenticated.

        The RPC counts as in flight until gRPC has sent its status (its termination callback), not merely
        until the handler returns: a drain that stopped the gRPC server between the two would cancel an
        answer that was complete."""
        with self._lock:
            if self._state == "draining" or self._state == "stopped":
                _abort(context, ServerUnavailable("the server is shutting down; retry on another replica"))
            if needs_engine and self._state == "starting":
                _abort(context, ServerUnavailable("the server is still loading its base model; retry shortly"))
            self._inflight += 1
        if not context.add_callback(self._leave):
            self._leave()  # already terminated
        try:
            if self.auth is None:
                return ANONYMOUS_ADMIN
            return self.auth.authenticate(dict(context.invocation_metadata()))
        except HotswapError as e:
            _abort(context, e)

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._lock.notify_all()

    @property
    def inflight(self) -> int:
        """RPCs admitted and not yet finished (what a drain waits for)."""
        with self._lock:
            return self._inflight

    def ready_engine(self) -> Engine:
        assert self.engine is not None  # enter() admitted the call only once loaded
        return self.engine


class _Inference(pb_grpc.InferenceServicer):
    def __init__(self, server: Server) -> None:
        self.s = server

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        final = None
        for chunk in self._run(request, context, stream=False):
            final = chunk.response
        return final if final is not None else pb.GenerateResponse()

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        yield from self._run(request, context, stream=True)

    def _run(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext, stream: bool
    ) -> Iterator[pb.GenerateChunk]:
        principal = self.s.enter(context)
        label, status, result = UNRESOLVED, "ok", None
        t0 = time.perf_counter()
        try:
            engine = self.s.ready_engine()
            refs = [authorize(self.s.registry, principal, a.ref).ref for a in request.adapters]
            label = self.s.metrics.adapter_label(refs)
            handle = engine.submit(to_request(request, refs))
            if not context.add_callback(handle.cancel):  # client cancel or deadline: the row leaves at the next step
                handle.cancel()  # it already ended
            if stream:
                yield from self._stream(handle, request, engine)
            result = handle.result()
            if not context.is_active():
                status = _ended_status(context)
                return
            if stream:
                yield pb.GenerateChunk(text="", response=to_response(result))
            else:
                yield pb.GenerateChunk(response=to_response(result))
        except HotswapError as e:
            status = mapping_for(e).grpc_status.lower()
            _abort(context, e)
        except GeneratorExit:  # a streaming client went away
            status = _ended_status(context)
            raise
        except Exception:
            status = "internal"
            log.exception("Generate failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            self._record(label, status, result, t0, context, stream)

    def _stream(self, handle: RequestHandle, request: pb.GenerateRequest, engine: Engine) -> Iterator[pb.GenerateChunk]:
        deltas = TextDeltas(engine.tokenizer, list(request.stop))
        for token in handle:
            yield pb.GenerateChunk(token_ids=[token], text=deltas.feed(token))
        result = handle.result()
        rest = deltas.rest(result.text or "")
        if rest:
            yield pb.GenerateChunk(text=rest)

    def _record(
        self, label: str, status: str, result: Result | None, t0: float, context: grpc.ServicerContext, stream: bool
    ) -> None:
        metrics = self.s.metrics
        if result is None:
            metrics.request_done(label, status, None)
        else:
            metrics.request_done(label, status, result.timings, result.prompt_tokens, len(result.token_ids))
        t = result.timings if result is not None else None
        log.info(
            "%s adapter=%s status=%s prompt_tokens=%d tokens=%d finish=%s "
            "queue_ms=%.1f ttft_ms=%.1f total_ms=%.1f peer=%s",
            "GenerateStream" if stream else "Generate",
            label,
            status,
            result.prompt_tokens if result else 0,
            len(result.token_ids) if result else 0,
            result.finish_reason if result else "-",
            t.queue_s * 1e3 if t else 0.0,
            t.ttft_s * 1e3 if t else 0.0,
            (t.total_s if t else time.perf_counter() - t0) * 1e3,
            context.peer(),
        )


class _Adapters(pb_grpc.AdaptersServicer):
    def __init__(self, server: Server) -> None:
        self.s = server

    @contextmanager
    def _call(self, context: grpc.ServicerContext, admin: bool = False) -> Iterator[Principal]:
        """Admit the RPC (and check the admin role) and turn our errors into its status."""
        principal = self.s.enter(context)
        try:
            if admin and not principal.is_admin:
                raise PermissionDenied("this call needs a token with role admin")
            yield principal
        except HotswapError as e:
            _abort(context, e)

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse:
        with self._call(context, admin=True):
            t0 = time.perf_counter()
            try:
                engine = self.s.ready_engine()
                exact = engine.load_adapter(request.ref, pin=request.pin, timeout=context.time_remaining())
            except futures.TimeoutError:
                raise DeadlineExceeded(f"{request.ref} was still loading when the deadline passed") from None
            return pb.LoadResponse(ref=exact, seconds=time.perf_counter() - t0)

    def Unload(self, request: pb.UnloadRequest, context: grpc.ServicerContext) -> pb.UnloadResponse:
        with self._call(context, admin=True):
            return pb.UnloadResponse(ref=self.s.ready_engine().unload_adapter(request.ref))

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        with self._call(context) as principal:
            return list_response(self.s.registry, principal, self.s.ready_engine().resident())

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        with self._call(context) as principal:
            return describe_response(self.s.registry, principal, request.ref, self.s.ready_engine().resident())


def list_response(registry: Registry, principal: Principal, resident_refs: list[str]) -> pb.ListResponse:
    """The adapters ``principal`` may see, with the versions of each resident in ``resident_refs``."""
    resident: dict[str, list[str]] = {}
    for ref in resident_refs:
        resident.setdefault(AdapterRef.parse(ref).full_name, []).append(ref)
    infos = [
        pb.AdapterInfo(
            name=item.name,
            latest=item.latest,
            versions=[m.version for m in registry.versions(item.name)],
            aliases=item.aliases,
            method=item.method,
            visibility=item.visibility,
            resident=resident.get(item.name, []),
        )
        for item in registry.list()
        if principal.may_see(item.visibility, AdapterRef.parse(item.name).tenant)
    ]
    return pb.ListResponse(adapters=infos)


def describe_response(registry: Registry, principal: Principal, ref: str, resident: list[str]) -> pb.DescribeResponse:
    m = authorize(registry, principal, ref)
    return pb.DescribeResponse(
        ref=m.ref,
        method=m.method,
        base_fingerprint=m.base_fingerprint or "",
        created_at=m.created_at,
        resident=m.ref in resident,
        manifest_json=m.to_json(),
    )


def to_request(msg: pb.GenerateRequest, exact_refs: list[str]) -> Request:
    """The engine request for ``msg``, with its adapters already resolved (and authorized) to exact refs."""
    weights = [a.weight if a.HasField("weight") else 1.0 for a in msg.adapters]
    return Request(
        prompt=msg.prompt or None,
        prompt_ids=list(msg.prompt_ids) or None,
        adapters=list(zip(exact_refs, weights, strict=True)),
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else 16,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        rank=msg.rank if msg.HasField("rank") else None,
    )


def to_response(result: Result) -> pb.GenerateResponse:
    t = result.timings
    return pb.GenerateResponse(
        text=result.text or "",
        token_ids=result.token_ids,
        finish_reason=_FINISH[result.finish_reason],
        usage=pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
        timings=pb.Timings(queue_seconds=t.queue_s, time_to_first_token_seconds=t.ttft_s, total_seconds=t.total_s),
        adapters=[pb.WeightedAdapter(ref=ref, weight=w) for ref, w in result.adapters],
    )
