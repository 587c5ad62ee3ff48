"""Scale-out on Ray Serve: several replicas, each owning one :class:`Engine`, with requests routed by adapter.

We write no router: Ray Serve's model multiplexing sends a request whose ``multiplexed_model_id`` is
already loaded on a replica to that replica, and a replica's ``@serve.multiplexed`` loader is where an
adapter becomes resident in its engine (Ray's LRU eviction unloads it again, drained first by the
engine). The multiplexed id of a request is its first adapter's ref, exactly as the request writes
it (``hotswap.client`` sets the metadata; a weighted list is routed by its first adapter). Requests
reach the replicas through Ray Serve's gRPC proxy, which serves ``hotswap.v1`` (with reflection).

The OpenAI-compatible HTTP API (:mod:`hotswap.serve.api.http`) is a second application on Ray Serve's HTTP proxy:
OpenAI clients name the adapter in the body (``model``), which the proxy does not read, so a small FastAPI
ingress deployment (:class:`HttpIngress`) reads it and calls the replicas' handle with that routing id. With
two applications on the cluster, Ray's gRPC proxy needs gRPC clients to name theirs (metadata ``application``).

Ray is an optional extra (``pip install hotswap[ray]``); nothing in the single-server mode imports
this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import ray
from grpc_health.v1 import health_pb2
from ray import serve
from ray._private import ray_constants
from ray.exceptions import RayError
from ray.serve.config import gRPCOptions
from ray.serve.exceptions import RayServeException
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from ray.util import metrics as ray_metrics

from hotswap import settings
from hotswap.client import MODEL_ID_KEY
from hotswap.errors import HotswapError, InvalidArgument, ServerUnavailable
from hotswap.registry import Registry
from hotswap.registry.registry import check_base
from hotswap.serve.api.auth import TokenAuth
from hotswap.serve.api.config import APP, APP_ARGS, RayOptions
from hotswap.serve.api.http import Head, HttpCore, Part, error_parts
from hotswap.serve.api.http import build_app as build_http_api
from hotswap.serve.api.http_api import Body, route_key
from hotswap.serve.api.metrics import Metrics
from hotswap.serve.api.server import SERVICES, ServerConfig
from hotswap.serve.api.servicer import Generation, Servicer
from hotswap.serve.api.status import ray_errors
from hotswap.serve.engine.engine import Engine
from hotswap.v1 import hotswap_pb2 as pb

log = logging.getLogger(__name__)

# Trailing metadata of every answer: which replica answered, where the request's first adapter was there
# when it arrived (resident, host or registry: Engine.cache_tier), and how many adapters that replica has
# loaded from the registry so far.
REPLICA_KEY, CACHE_KEY, LOADS_KEY = "hotswap-replica", "hotswap-cache", "hotswap-adapter-loads"
SERVICER_FUNCTIONS = [
    "hotswap.v1.hotswap_pb2_grpc.add_InferenceServicer_to_server",
    "hotswap.v1.hotswap_pb2_grpc.add_AdaptersServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


class _RaySeries:
    """prometheus_client's ``labels()/inc()/observe()/set()`` over a ``ray.util.metrics`` metric, every sample
    also tagged with the replica."""

    def __init__(self, metric: Any, keys: Sequence[str], replica: str, values: Sequence[str] = ()) -> None:
        self.metric, self.keys, self.replica, self.values = metric, tuple(keys), replica, tuple(values)

    def labels(self, *values: str) -> _RaySeries:
        return _RaySeries(self.metric, self.keys, self.replica, values)

    def _tags(self) -> dict[str, str]:
        return {"replica": self.replica, **dict(zip(self.keys, self.values, strict=True))}

    def inc(self, amount: float = 1.0) -> None:
        self.metric.inc(amount, tags=self._tags())

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self._tags())

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self._tags())


class RayMetrics(Metrics):
    """The server's series (names, labels, buckets) exported through Ray's metrics agent, plus a ``replica``
    label: Prometheus scrapes them from Ray's metrics endpoint (Ray prefixes the names with ``ray_``)."""

    def __init__(self, replica: str, max_adapter_labels: int) -> None:
        self.replica = replica
        super().__init__(max_adapter_labels)

    def _counter(self, name: str, doc: str, labels: list[str]) -> Any:
        return _RaySeries(ray_metrics.Counter(name, doc, tag_keys=(*labels, "replica")), labels, self.replica)

    def _histogram(self, name: str, doc: str, labels: list[str], buckets: Sequence[float]) -> Any:
        metric = ray_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=(*labels, "replica"))
        return _RaySeries(metric, labels, self.replica)

    def _gauge(self, name: str, doc: str) -> Any:
        return _RaySeries(ray_metrics.Gauge(name, doc, tag_keys=("replica",)), (), self.replica)

    def watch(self, resident: Callable[[], int], queued: Callable[[], int], running: Callable[[], int]) -> None:
        """Ray gauges hold values, not callbacks: a daemon thread sets them every second."""

        def poll() -> None:
            while True:
                self.resident.set(resident())
                self.queued.set(queued())
                self.running.set(running())
                threading.Event().wait(1.0)

        threading.Thread(target=poll, name="hotswap-gauges", daemon=True).start()


class _Resident:
    """An adapter held in Ray's multiplexed-model cache; Ray dropping it unloads it from the engine."""

    def __init__(self, engine: Engine, ref: str) -> None:
        self.engine, self.ref = engine, ref

    def __del__(self) -> None:
        try:
            self.engine.unload_adapter(self.ref)  # drains: rows using it finish first
        except HotswapError as e:  # engine closing, or the version was deleted meanwhile
            log.debug("unloading %s: %s", self.ref, e)


class Replica:
    """One Ray Serve replica: one engine under the servicer core; ``hotswap.v1`` (Inference, Adapters) and health.
    Ray's additions: routing by adapter (multiplexing), the answering replica in trailing metadata."""

    def __init__(self, config: ServerConfig, route_by_adapter: bool = True) -> None:
        self.config, self.route_by_adapter = config, route_by_adapter
        auth = TokenAuth.from_file(config.auth) if config.auth is not None else None
        self.registry = Registry(config.registry)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = RayMetrics(self.replica_id, config.max_adapter_labels)
        self.engine = Engine(config.base, self.registry, config.engine, observer=self.metrics)
        self.core = Servicer(self.registry, self.metrics, auth, log)
        self.core.engine = engine = self.engine
        self.metrics.watch(lambda: len(engine.resident()), lambda: engine.counts()[0], lambda: engine.counts()[1])
        # HTTP calls wait for tokens on threads of their own: as many as Ray sends this replica at once
        threads = futures.ThreadPoolExecutor(max_ongoing(config) + 8, thread_name_prefix="hotswap-http")
        self.http = HttpCore(self.core, Path(config.base), config.model_name, threads, self._http_place)

    async def adapter(self, ref: str) -> _Resident:
        """Make ``ref`` resident: the multiplexed loader (``deployment()`` puts Ray's model cache around it,
        so a replica loads an adapter once and Ray routes the adapter's requests to it)."""
        exact = await asyncio.to_thread(self.engine.load_adapter, ref)
        log.info("replica %s loaded %s", self.replica_id, exact)
        return _Resident(self.engine, exact)

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine loop died, or whose steps keep failing for no
        request's fault, is restarted."""
        if not self.engine.alive:
            raise RuntimeError("the engine loop has stopped")
        if not self.engine.healthy:
            raise RuntimeError("the engine's steps keep failing")

    def __del__(self) -> None:
        self.engine.close()

    # -- hotswap.v1.Inference ----------------------------------------------------------------------
    @ray_errors
    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        final = pb.GenerateResponse()
        async for chunk in self._run(request, grpc_context, stream=False):
            final = chunk.response
        return final

    @ray_errors
    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in self._run(request, grpc_context, stream=True):
            yield chunk

    async def _run(
        self, request: pb.GenerateRequest, context: RayServegRPCContext, stream: bool
    ) -> AsyncIterator[pb.GenerateChunk]:
        with self.core.generation(request, "GenerateStream" if stream else "Generate", context.peer()) as g:
            g.authorize(context.invocation_metadata())
            tier = await self._place(g)
            handle = g.submit()
            if stream:
                # tokens produced while the last chunk was in flight go out together: Ray's streaming
                # hop costs more per message than a decode step of a small model
                while (delta := await asyncio.to_thread(handle.next_delta)) is not None:
                    yield g.chunk(delta)
            final = g.final(await asyncio.to_thread(handle.result), merge_rest=True)
            loads = self.engine.pool.stats.registry_loads
            context.set_trailing_metadata([(REPLICA_KEY, self.replica_id), (CACHE_KEY, tier), (LOADS_KEY, str(loads))])
            for chunk in final:
                yield chunk

    async def _place(self, g: Generation) -> str:
        """Between authorizing a generation and submitting it: refuse another base's adapter (before routing or
        loading, as the engine would), check the routing id and make the first adapter resident through Ray's
        multiplexed loader. Returns where that adapter was (Engine.cache_tier)."""
        for manifest in g.manifests:
            check_base(manifest, self.engine.base_fingerprint)
        first = g.request.adapters[0].ref if g.request.adapters else ""
        tier = self.engine.cache_tier(g.refs[0]) if g.refs else "resident"
        if self.route_by_adapter:
            self._check_route(first)
            if first:
                await self.adapter(first)
        return tier

    def _check_route(self, first: str) -> None:
        model_id = serve.get_multiplexed_model_id()
        if model_id != first:
            raise InvalidArgument(
                f"gRPC metadata {MODEL_ID_KEY} must be the first adapter's ref ({first!r}), got {model_id!r}; "
                "hotswap.client sets it"
            )

    # -- hotswap.v1.Adapters (List, Describe and Check answer from the replica Ray picks) ------------------
    @ray_errors
    async def Load(self, request: pb.LoadRequest, grpc_context: RayServegRPCContext) -> pb.LoadResponse:
        """Prefetch through Ray's routing: the replica that would serve ``ref`` loads it."""
        self.core.admin(grpc_context.invocation_metadata())
        if request.pin:
            raise InvalidArgument("pinning is not available with --ray: Ray's multiplexing owns residency (LRU)")
        self._check_route(request.ref)
        t0 = time.perf_counter()
        resident = await self.adapter(request.ref)
        return pb.LoadResponse(ref=resident.ref, seconds=time.perf_counter() - t0)

    @ray_errors
    async def Unload(self, request: pb.UnloadRequest, grpc_context: RayServegRPCContext) -> pb.UnloadResponse:
        raise InvalidArgument("Unload is not available with --ray: Ray's multiplexing evicts adapters (LRU)")

    @ray_errors
    async def List(self, request: pb.ListRequest, grpc_context: RayServegRPCContext) -> pb.ListResponse:
        return self.core.list(grpc_context.invocation_metadata())

    @ray_errors
    async def Describe(self, request: pb.DescribeRequest, grpc_context: RayServegRPCContext) -> pb.DescribeResponse:
        return self.core.describe(grpc_context.invocation_metadata(), request)

    # -- the OpenAI-compatible HTTP API, called by HttpIngress --------------------------------------------------
    async def http_generate(self, body: Body, authorization: str | None, peer: str) -> AsyncIterator[Part]:
        async for part in self.http.generate(body, authorization, peer):
            yield part

    async def http_models(self, authorization: str | None) -> list[Part]:
        return await self.http.models(authorization)

    async def http_health(self) -> bool:
        return self.engine.alive and self.engine.healthy

    async def _http_place(self, g: Generation) -> dict[str, str]:
        """:meth:`_place`, and the answer's headers: as the gRPC answer's trailing metadata."""
        tier = await self._place(g)
        loads = str(self.engine.pool.stats.registry_loads)
        return {REPLICA_KEY: self.replica_id, CACHE_KEY: tier, LOADS_KEY: loads}

    # -- grpc.health.v1.Health -----------------------------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse
        if request.service not in ("", *SERVICES):
            return status(status=status.SERVICE_UNKNOWN)
        return status(status=status.SERVING if self.engine.healthy else status.NOT_SERVING)


class RayBackend:
    """The HTTP API's calls on the replicas: a generation goes to the replica Ray routes its first adapter to."""

    def __init__(self, replicas: DeploymentHandle, model_name: str) -> None:
        self.replicas, self.model_name = replicas, model_name

    async def models(self, authorization: str | None) -> list[Part]:
        return await self.replicas.http_models.remote(authorization)

    async def health(self) -> bool:
        return await self.replicas.http_health.remote()

    async def generate(self, body: Body, authorization: str | None, peer: str) -> AsyncIterator[Part]:
        key = route_key(body, self.model_name)
        call = self.replicas.options(stream=True, **({"multiplexed_model_id": key} if key else {})).http_generate
        streaming = False
        try:
            async for part in call.remote(body, authorization, peer):
                streaming = streaming or (isinstance(part, Head) and part.stream)
                yield part
        except (RayError, RayServeException) as e:  # the replica died, or Ray refused the request
            log.warning("HTTP request failed in Ray: %s", e)
            error = ServerUnavailable(f"the replica serving this request failed ({type(e).__name__}); retry")
            for part in error_parts(error, streaming):
                yield part


class HttpIngress:
    """The HTTP API's ingress deployment (FastAPI; :func:`http_deployment`): reads ``model`` and calls the
    replicas of application ``app`` with its routing id (``multiplexed_model_id``), as the gRPC client sends it."""

    def __init__(self, app: str, model_name: str) -> None:
        self.backend = RayBackend(serve.get_deployment_handle("HotswapReplica", app_name=app), model_name)

    def __serve_build_asgi_app__(self) -> Any:
        return build_http_api(self.backend)


def max_ongoing(config: ServerConfig) -> int:
    """Requests Ray sends one engine replica at once."""
    return max(config.engine.max_batch * 2, 8)


def http_deployment(config: ServerConfig, options: RayOptions) -> Any:
    """The HTTP ingress deployment: light (no CPU reserved), relaying as many requests as the replicas hold."""
    return serve.deployment(
        serve.ingress()(HttpIngress),
        name="HotswapHTTP",
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max_ongoing(config) * options.replicas,
    )


def deployment(config: ServerConfig, options: RayOptions) -> Any:
    """The Ray Serve deployment: ``Replica`` with its multiplexed loader (``options.adapters_per_replica``)."""
    # Ray finds the cache's owner by looking the wrapped function up on self under its own name.
    multiplexed = serve.multiplexed(max_num_models_per_replica=options.adapters_per_replica)(Replica.adapter)
    cls = type("HotswapReplica", (Replica,), {"adapter": multiplexed})
    return serve.deployment(
        cls,
        name="HotswapReplica",
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        max_ongoing_requests=max_ongoing(config),
    )


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (``import_path: hotswap.serve.api.scaleout:build_app`` in a Serve config,
    e.g. deploy/rayservice.yaml): ``args`` are settings by field name of ServerConfig (``base`` and ``registry``
    required), its EngineConfig and RayOptions, as ``hotswap serve --config`` takes them, less those the Serve
    config sets itself (ports, proxies, TLS, the cluster's address): :data:`hotswap.serve.api.config.APP_ARGS`."""
    source = "hotswap application args"
    values = settings.normalize(args, APP_ARGS, source)
    config = settings.build(ServerConfig, values, source)
    options = settings.build(RayOptions, values, source)
    return deployment(config, options).bind(config, options.route_by_adapter)


def build_http_app(args: dict[str, Any]) -> Any:
    """The HTTP API's application builder, for a Serve config's second application (``route_prefix: /``): the same
    ``args`` as :func:`build_app`'s (``app`` names the gRPC application whose replicas answer, default hotswap)."""
    source = "hotswap HTTP application args"
    app = args.get("app", APP)
    values = settings.normalize({k: v for k, v in args.items() if k != "app"}, APP_ARGS, source)
    config = settings.build(ServerConfig, values, source)
    options = settings.build(RayOptions, values, source)
    return http_deployment(config, options).bind(app, config.model_name)


def http_app_name(app: str) -> str:
    """The HTTP API's application beside the gRPC application ``app``."""
    return f"{app}-http"


def init_local_ray(**kwargs: Any) -> None:
    """Start a Ray of our own whose node address is loopback, so its internal traffic (GCS, raylet, object
    transfers, the proxies' node address) never uses the machine's external interface.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray resolves a loopback address to the
    machine's routable one unless clusters are disabled, which its own environment switch does (read at
    import by the processes Ray starts, and at call time by this one)."""
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(_node_ip_address="127.0.0.1", **kwargs)


def start(config: ServerConfig, options: RayOptions) -> None:
    """Connect to (or start) Ray, start Serve's proxies (gRPC on ``options.grpc_port``) and deploy."""
    if not ray.is_initialized():
        if options.address is None:
            init_local_ray(logging_level=logging.WARNING)
        else:
            ray.init(address=options.address, logging_level=logging.WARNING)
    serve.start(
        http_options={"host": config.host, "port": options.http_port},
        grpc_options=gRPCOptions(port=options.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    deploy(config, options)


def deploy(config: ServerConfig, options: RayOptions) -> None:
    """Deploy (or redeploy) the application on the running Serve instance; returns once it is ready."""
    app = deployment(config, options).bind(config, options.route_by_adapter)
    serve.run(app, name=options.app, route_prefix=f"/{options.app}")
    if config.http_port is not None:  # the OpenAI API at the root of Ray Serve's HTTP proxy
        ingress = http_deployment(config, options).bind(options.app, config.model_name)
        serve.run(ingress, name=http_app_name(options.app), route_prefix="/")


def stop(app: str = APP) -> None:
    """Delete the applications (other applications on the cluster keep running); leave Ray."""
    if http_app_name(app) in serve.status().applications:
        serve.delete(http_app_name(app))
    serve.delete(app)
    ray.shutdown()
