"""The gRPC server: ``hotswap.v1`` (Inference, Adapters) over one :class:`Engine`, plus the standard health
and reflection services and Prometheus ``/metrics``; with ``http_port``, the OpenAI-compatible HTTP API
(:mod:`hotswap.serve.api.http`) in the same process, over the same engine, admitted and drained with the gRPC calls.

Life cycle: :meth:`Server.open` binds the port and answers health (NOT_SERVING) and metrics at once;
:meth:`Server.load` loads the base model (Generate answers UNAVAILABLE until then) and turns SERVING;
:meth:`Server.stop` drains: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish within
the grace period, the rest are cancelled, then the engine closes.

The calls themselves are the servicer core's (:mod:`hotswap.serve.api.servicer`, shared with the Ray replica); this
module adds what is gRPC's: admission and drain, cancel and deadline callbacks, one token per stream chunk. Every
error leaves through :class:`~hotswap.serve.api.status.ErrorInterceptor`: the gRPC status from
:data:`hotswap.errors.ERROR_TABLE`, a message saying what to fix, and the error class in trailing metadata
``hotswap-error`` (the Python client re-raises that class).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hotswap.errors import ServerUnavailable
from hotswap.registry import Registry
from hotswap.serve.api.auth import TokenAuth
from hotswap.serve.api.config import ServerConfig
from hotswap.serve.api.http import HttpCore, HttpServer, LocalBackend, build_app
from hotswap.serve.api.metrics import Metrics
from hotswap.serve.api.servicer import Servicer
from hotswap.serve.api.status import ErrorInterceptor
from hotswap.serve.engine.engine import Engine
from hotswap.v1 import hotswap_pb2 as pb
from hotswap.v1 import hotswap_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Inference", "Adapters"))


def _ended_status(context: grpc.ServicerContext) -> str:
    """Status label of an RPC the client ended (cancel or deadline) before we answered."""
    remaining = context.time_remaining()
    return "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.auth = TokenAuth.from_file(config.auth) if config.auth is not None else None
        self.registry = Registry(config.registry)
        self.metrics = Metrics(config.max_adapter_labels)
        self.core = Servicer(self.registry, self.metrics, self.auth, log)
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # the OpenAI-compatible API's, when config.http_port is set
        self._health = health.HealthServicer()
        self._serving = False  # what the health service says
        self._grpc: grpc.Server | None = None
        self._http: object | None = None  # the metrics endpoint
        self._api: HttpServer | None = None
        self._api_threads: futures.ThreadPoolExecutor | None = None
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
            interceptors=[ErrorInterceptor(SERVICES, log)],
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
        if cfg.http_port is not None:
            self._open_api(workers)
        log.info("listening on %s:%d (%s), metrics on %s, HTTP API on %s", cfg.host, self.port,
                 "TLS" if cfg.tls_cert else "plaintext",
                 f"{cfg.host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
                 f"{cfg.host}:{self.http_port}/v1" if self.http_port else "off")  # fmt: skip
        return self

    def _open_api(self, workers: int) -> None:
        """The OpenAI-compatible API on ``http_port``: its calls wait for tokens on threads of their own."""
        cfg = self.config
        self._api_threads = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hotswap-http")
        core = HttpCore(self.core, Path(cfg.base), cfg.model_name, self._api_threads)
        backend = LocalBackend(core, self.admit, self._leave, lambda: self._serving)
        app = build_app(backend, self.metrics.registry if cfg.http_metrics else None)
        tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert is not None and cfg.tls_key is not None else None
        self._api = HttpServer(app, cfg.host, cfg.http_port, tls).start()
        self.http_port = self._api.port

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
            self.core.engine, self._state = engine, "serving"
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
            self.engine.close()  # HTTP calls still running end with EngineClosed
        if self._api is not None:
            self._api.stop()
        if self._api_threads is not None:
            self._api_threads.shutdown(wait=False)
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
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        for service in ("", *SERVICES):
            self._health.set(service, status)

    @property
    def engine(self) -> Engine | None:
        """The engine, once :meth:`load` has loaded the base model."""
        return self.core.engine

    # -- admission -------------------------------------------------------------------------------------------
    def enter(self, context: grpc.ServicerContext) -> None:
        """Admit an RPC: the server must be serving (the caller is authenticated by the core).

        The RPC counts as in flight until gRPC has sent its status (its termination callback), not merely
        until the handler returns: a drain that stopped the gRPC server between the two would cancel an
        answer that was complete."""
        self.admit()
        if not context.add_callback(self._leave):
            self._leave()  # already terminated

    def admit(self) -> None:
        """Admit a call of either API (it counts as in flight until ``_leave``): the server must be serving."""
        with self._lock:
            if self._state == "draining" or self._state == "stopped":
                raise ServerUnavailable("the server is shutting down; retry on another replica")
            if self._state == "starting":
                raise ServerUnavailable("the server is still loading its base model; retry shortly")
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._lock.notify_all()

    @property
    def inflight(self) -> int:
        """RPCs admitted and not yet finished (what a drain waits for)."""
        with self._lock:
            return self._inflight


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
        self.s.enter(context)
        rpc = "GenerateStream" if stream else "Generate"
        with self.s.core.generation(request, rpc, context.peer(), lambda: _ended_status(context)) as g:
            g.authorize(context.invocation_metadata())
            handle = g.submit()
            if not context.add_callback(handle.cancel):  # client cancel or deadline: the row leaves at the next step
                handle.cancel()  # it already ended
            if stream:
                while (delta := handle.next_delta()) is not None:
                    yield g.chunk(delta)
            final = g.final(handle.result())
            if not context.is_active():
                g.left()
                return
            yield from final


class _Adapters(pb_grpc.AdaptersServicer):
    def __init__(self, server: Server) -> None:
        self.s = server

    def _enter(self, context: grpc.ServicerContext) -> Servicer:
        self.s.enter(context)
        return self.s.core

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse:
        return self._enter(context).load(context.invocation_metadata(), request, context.time_remaining())

    def Unload(self, request: pb.UnloadRequest, context: grpc.ServicerContext) -> pb.UnloadResponse:
        return self._enter(context).unload(context.invocation_metadata(), request)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        return self._enter(context).list(context.invocation_metadata())

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        return self._enter(context).describe(context.invocation_metadata(), request)
