"""Scale-out on Ray Serve: several replicas, each owning one :class:`Engine`, with requests routed by adapter.

We write no router: Ray Serve's model multiplexing sends a request whose ``multiplexed_model_id`` is
already loaded on a replica to that replica, and a replica's ``@serve.multiplexed`` loader is where an
adapter becomes resident in its engine (Ray's LRU eviction unloads it again, drained first by the
engine). The multiplexed id of a request is its first adapter's ref, exactly as the request writes
it (``hotswap.client`` sets the metadata; a weighted list is routed by its first adapter). Requests
reach the replicas through Ray Serve's gRPC proxy, which serves ``hotswap.v1`` (with reflection).

Ray is an optional extra (``pip install hotswap[ray]``); nothing in the single-server mode imports
this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from grpc_health.v1 import health_pb2
from ray import serve
from ray._private import ray_constants
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext
from ray.util import metrics as ray_metrics

from hotswap.client import MODEL_ID_KEY
from hotswap.errors import HotswapError, InvalidArgument, PermissionDenied, clip_message, mapping_for
from hotswap.registry import Registry
from hotswap.serve.auth import ANONYMOUS_ADMIN, Principal, TokenAuth, authorize
from hotswap.serve.config import APP, EngineConfig, RayOptions
from hotswap.serve.engine import Engine
from hotswap.serve.metrics import UNRESOLVED, Metrics
from hotswap.serve.server import (
    SERVICES,
    ServerConfig,
    TextDeltas,
    describe_response,
    list_response,
    status_of,
    to_request,
    to_response,
)
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


@contextmanager
def _status(context: RayServegRPCContext) -> Iterator[None]:
    """Our errors leave with their gRPC status; the class travels in the message (errors lose trailers)."""
    try:
        yield
    except HotswapError as e:
        code, trailing = status_of(e)
        context.set_code(code)
        context.set_details(f"{trailing[0][1]}: {clip_message(str(e))}")
        raise  # Ray's proxy answers with the status set above


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
    """One Ray Serve replica: one engine; ``Generate`` and ``GenerateStream`` of ``hotswap.v1.Inference``."""

    def __init__(self, config: ServerConfig, route_by_adapter: bool = True) -> None:
        self.config, self.route_by_adapter = config, route_by_adapter
        self.auth = TokenAuth.from_file(config.auth) if config.auth is not None else None
        self.registry = Registry(config.registry)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = RayMetrics(self.replica_id, config.max_adapter_labels)
        self.engine = Engine(config.base, self.registry, config.engine, observer=self.metrics)
        engine = self.engine
        self.metrics.watch(lambda: len(engine.resident()), lambda: engine.counts()[0], lambda: engine.counts()[1])

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
    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        final = pb.GenerateResponse()
        async for chunk in self._run(request, grpc_context, stream=False):
            final = chunk.response
        return final

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in self._run(request, grpc_context, stream=True):
            yield chunk

    async def _run(
        self, request: pb.GenerateRequest, context: RayServegRPCContext, stream: bool
    ) -> AsyncIterator[pb.GenerateChunk]:
        label, status, result, handle = UNRESOLVED, "ok", None, None
        try:
            with _status(context):
                principal = self._principal(context)
                refs = [authorize(self.registry, principal, a.ref).ref for a in request.adapters]
                label = self.metrics.adapter_label(refs)
                for ref in refs:  # refuse another base's adapter before routing/loading, as the engine would
                    self.registry.resolve(ref, base_fingerprint=self.engine.base_fingerprint)
                first = request.adapters[0].ref if request.adapters else ""
                tier = self.engine.cache_tier(refs[0]) if refs else "resident"
                if self.route_by_adapter:
                    self._check_route(first)
                    if first:
                        await self.adapter(first)
                handle = self.engine.submit(to_request(request, refs))
                if stream:
                    deltas = TextDeltas(self.engine.tokenizer, list(request.stop))
                    # tokens produced while the last chunk was in flight go out together: Ray's streaming
                    # hop costs more per message than a decode step of a small model
                    while (tokens := await asyncio.to_thread(handle.next_tokens)) is not None:
                        yield pb.GenerateChunk(token_ids=tokens, text="".join(deltas.feed(t) for t in tokens))
                result = await asyncio.to_thread(handle.result)
            loads = self.engine.pool.stats.registry_loads
            context.set_trailing_metadata([(REPLICA_KEY, self.replica_id), (CACHE_KEY, tier), (LOADS_KEY, str(loads))])
            if stream:
                rest = deltas.rest(result.text or "")
                yield pb.GenerateChunk(text=rest, response=to_response(result))
            else:
                yield pb.GenerateChunk(response=to_response(result))
        except HotswapError as e:
            status = mapping_for(e).grpc_status.lower()
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: free the row at the next step
            status = "cancelled"
            if handle is not None:
                handle.cancel()
            raise
        finally:
            if result is None:
                self.metrics.request_done(label, status, None)
            else:
                timings, tokens = result.timings, len(result.token_ids)
                self.metrics.request_done(label, status, timings, result.prompt_tokens, tokens)

    def _check_route(self, first: str) -> None:
        model_id = serve.get_multiplexed_model_id()
        if model_id != first:
            raise InvalidArgument(
                f"gRPC metadata {MODEL_ID_KEY} must be the first adapter's ref ({first!r}), got {model_id!r}; "
                "hotswap.client sets it"
            )

    # -- hotswap.v1.Adapters (List, Describe and Check answer from the replica Ray picks) ------------------
    async def Load(self, request: pb.LoadRequest, grpc_context: RayServegRPCContext) -> pb.LoadResponse:
        """Prefetch through Ray's routing: the replica that would serve ``ref`` loads it."""
        with _status(grpc_context):
            if not self._principal(grpc_context).is_admin:
                raise PermissionDenied("this call needs a token with role admin")
            if request.pin:
                raise InvalidArgument("pinning is not available with --ray: Ray's multiplexing owns residency (LRU)")
            self._check_route(request.ref)
            t0 = time.perf_counter()
            resident = await self.adapter(request.ref)
            return pb.LoadResponse(ref=resident.ref, seconds=time.perf_counter() - t0)

    async def Unload(self, request: pb.UnloadRequest, grpc_context: RayServegRPCContext) -> pb.UnloadResponse:
        with _status(grpc_context):
            raise InvalidArgument("Unload is not available with --ray: Ray's multiplexing evicts adapters (LRU)")

    async def List(self, request: pb.ListRequest, grpc_context: RayServegRPCContext) -> pb.ListResponse:
        with _status(grpc_context):
            return list_response(self.registry, self._principal(grpc_context), self.engine.resident())

    async def Describe(self, request: pb.DescribeRequest, grpc_context: RayServegRPCContext) -> pb.DescribeResponse:
        with _status(grpc_context):
            principal = self._principal(grpc_context)
            return describe_response(self.registry, principal, request.ref, self.engine.resident())

    # -- grpc.health.v1.Health -----------------------------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse
        if request.service not in ("", *SERVICES):
            return status(status=status.SERVICE_UNKNOWN)
        return status(status=status.SERVING if self.engine.healthy else status.NOT_SERVING)

    def _principal(self, context: RayServegRPCContext) -> Principal:
        if self.auth is None:
            return ANONYMOUS_ADMIN
        return self.auth.authenticate(dict(context.invocation_metadata()))


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
        max_ongoing_requests=max(config.engine.max_batch * 2, 8),
    )


_ENGINE_ARGS = ("max_batch", "max_queue", "max_resident", "max_seq_len", "device", "dtype")
_RAY_ARGS = ("replicas", "replica_cpus", "route_by_adapter", "adapters_per_replica")


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (``import_path: hotswap.serve.scaleout:build_app`` in a Serve config,
    e.g. deploy/rayservice.yaml): ``args`` holds ``base``, ``registry``, ``auth`` or ``no_auth``, the engine's
    limits (max_batch, max_queue, max_resident, max_seq_len, device, dtype), replicas, replica_cpus and
    adapters_per_replica."""
    known = {"base", "registry", "auth", "no_auth", "max_adapter_labels", *_ENGINE_ARGS, *_RAY_ARGS}
    if unknown := sorted(set(args) - known):
        raise InvalidArgument(f"unknown hotswap application args {unknown}; known: {sorted(known)}")
    if "base" not in args or "registry" not in args:
        raise InvalidArgument("hotswap application args need base and registry")
    config = ServerConfig(
        base=Path(args["base"]),
        registry=str(args["registry"]),
        auth=Path(args["auth"]) if args.get("auth") else None,
        no_auth=bool(args.get("no_auth", False)),
        max_adapter_labels=int(args.get("max_adapter_labels", 100)),
        engine=EngineConfig(**{k: args[k] for k in _ENGINE_ARGS if k in args}),
    )
    options = RayOptions(**{k: args[k] for k in _RAY_ARGS if k in args})
    return deployment(config, options).bind(config, options.route_by_adapter)


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


def stop(app: str = APP) -> None:
    """Delete the application (other applications on the cluster keep running); leave Ray."""
    serve.delete(app)
    ray.shutdown()
