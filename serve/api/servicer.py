"""The servicer core: what each ``hotswap.v1`` call does, written once for every transport (the gRPC server in
:mod:`hotswap.serve.api.server`, the Ray replica in :mod:`hotswap.serve.api.scaleout`, the OpenAI-compatible HTTP API in
:mod:`hotswap.serve.api.http`, which speaks to it in ``hotswap.v1`` requests too).

A generation (:class:`Generation`) goes: authorize the caller for each adapter ref, which resolves it (the
request's one resolve: the engine gets the manifests) -> submit the engine request -> chunks (the token ids and
text deltas of its handle) -> the final response;
and it is recorded when it ends, however it ends: ``Metrics.request_done`` and one log line. A transport drives
these steps with its own I/O (threads for gRPC, asyncio for Ray). Nothing here catches an error to answer it:
:mod:`hotswap.serve.api.status` turns what is raised into a status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType

from hotswap.errors import DeadlineExceeded, HotswapError, PermissionDenied, mapping_for
from hotswap.registry import AdapterRef, Manifest, Registry
from hotswap.registry.registry import AdapterSummary
from hotswap.serve.api.auth import ANONYMOUS_ADMIN, Principal, TokenAuth, authorize
from hotswap.serve.api.metrics import UNRESOLVED, Metrics
from hotswap.serve.engine.engine import Engine, RequestHandle
from hotswap.serve.engine.request import Delta
from hotswap.serve.engine.types import FinishReason, Request, Result
from hotswap.v1 import hotswap_pb2 as pb

Metadata = Sequence[tuple[str, str]]
# the wire's FINISH_REASON_<NAME> for each FinishReason.<NAME> (a reason the proto lacks fails here, at import)
FINISH_TO_PB = {reason: pb.FinishReason.Value(f"FINISH_REASON_{reason.name}") for reason in FinishReason}
FINISH_FROM_PB = {value: reason for reason, value in FINISH_TO_PB.items()}


def _cancelled() -> str:
    return "cancelled"


@dataclass(frozen=True)
class Visible:
    """An adapter a caller may see: its registry summary, its versions and those resident in the engine."""

    summary: AdapterSummary
    versions: list[int]
    resident: list[str]  # exact refs, e.g. "math@2"


class Servicer:
    """One serving process's registry, metrics, auth and (once loaded) engine, and the calls on them.
    ``log`` is the transport's logger: each request's line goes there."""

    def __init__(self, registry: Registry, metrics: Metrics, auth: TokenAuth | None, log: logging.Logger) -> None:
        self.registry, self.metrics, self.auth, self.log = registry, metrics, auth, log
        self.engine: Engine | None = None  # set once the base model is loaded

    @property
    def ready(self) -> Engine:
        assert self.engine is not None, "the transport admits calls only once the engine is loaded"
        return self.engine

    def principal(self, metadata: Metadata) -> Principal:
        """Who calls (``authorization: Bearer`` metadata); everyone is an admin when auth is off."""
        return ANONYMOUS_ADMIN if self.auth is None else self.auth.authenticate(dict(metadata))

    def admin(self, metadata: Metadata) -> Principal:
        principal = self.principal(metadata)
        if not principal.is_admin:
            raise PermissionDenied("this call needs a token with role admin")
        return principal

    def generation(
        self,
        request: pb.GenerateRequest,
        rpc: str,
        peer: str,
        ended: Callable[[], str] = _cancelled,
        *,
        stream: bool | None = None,
        api: str = "grpc",
    ) -> Generation:
        """One Generate (``rpc``) call, recorded as it leaves the ``with`` block; ``ended`` names the status of a
        call its client ended (cancelled, or deadline_exceeded where the transport can tell). ``stream``: whether
        it streams (default: ``rpc`` is GenerateStream); ``api``: the metrics' api label."""
        stream = rpc == "GenerateStream" if stream is None else stream
        return Generation(self, request, rpc, peer, ended, stream, api)

    # -- hotswap.v1.Adapters ---------------------------------------------------------------------------------
    def load(self, metadata: Metadata, request: pb.LoadRequest, timeout: float | None) -> pb.LoadResponse:
        self.admin(metadata)
        t0 = time.perf_counter()
        try:
            exact = self.ready.load_adapter(request.ref, pin=request.pin, timeout=timeout)
        except futures.TimeoutError:
            raise DeadlineExceeded(f"{request.ref} was still loading when the deadline passed") from None
        return pb.LoadResponse(ref=exact, seconds=time.perf_counter() - t0)

    def unload(self, metadata: Metadata, request: pb.UnloadRequest) -> pb.UnloadResponse:
        self.admin(metadata)
        return pb.UnloadResponse(ref=self.ready.unload_adapter(request.ref))

    def visible(self, metadata: Metadata) -> list[Visible]:
        """The adapters the caller may see, with the versions of each that are resident."""
        principal = self.principal(metadata)
        resident: dict[str, list[str]] = {}
        for ref in self.ready.resident():
            resident.setdefault(AdapterRef.parse(ref).full_name, []).append(ref)
        return [
            Visible(item, [m.version for m in self.registry.versions(item.name)], resident.get(item.name, []))
            for item in self.registry.list()
            if principal.may_see(item.visibility, AdapterRef.parse(item.name).tenant)
        ]

    def list(self, metadata: Metadata) -> pb.ListResponse:
        infos = [
            pb.AdapterInfo(
                name=v.summary.name,
                latest=v.summary.latest,
                versions=v.versions,
                aliases=v.summary.aliases,
                method=v.summary.method,
                visibility=v.summary.visibility,
                resident=v.resident,
            )
            for v in self.visible(metadata)
        ]
        return pb.ListResponse(adapters=infos)

    def describe(self, metadata: Metadata, request: pb.DescribeRequest) -> pb.DescribeResponse:
        m = authorize(self.registry, self.principal(metadata), request.ref)
        return pb.DescribeResponse(
            ref=m.ref,
            method=m.method,
            base_fingerprint=m.base_fingerprint or "",
            created_at=m.created_at,
            resident=m.ref in self.ready.resident(),
            manifest_json=m.to_json(),
        )

    # -- recording ---------------------------------------------------------------------------------------------
    def record(self, g: Generation) -> None:
        """Count a finished generation and log its line."""
        r = g.result
        if r is None:
            self.metrics.request_done(g.label, g.status, None, api=g.api)
        else:
            self.metrics.request_done(g.label, g.status, r.timings, r.prompt_tokens, len(r.token_ids), g.api)
        t = r.timings if r is not None else None
        self.log.info(
            "%s adapter=%s status=%s prompt_tokens=%d tokens=%d finish=%s "
            "queue_ms=%.1f ttft_ms=%.1f total_ms=%.1f peer=%s",
            g.rpc,
            g.label,
            g.status,
            r.prompt_tokens if r else 0,
            len(r.token_ids) if r else 0,
            r.finish_reason if r else "-",
            t.queue_s * 1e3 if t else 0.0,
            t.ttft_s * 1e3 if t else 0.0,
            (t.total_s if t else time.perf_counter() - g.t0) * 1e3,
            g.peer,
        )


class Generation:
    """One Generate or GenerateStream call: ``with`` it, then :meth:`authorize`, :meth:`submit`, :meth:`chunk` per
    token batch (streaming) and :meth:`final`. Leaving the block records it with the status of how it left."""

    def __init__(
        self,
        core: Servicer,
        request: pb.GenerateRequest,
        rpc: str,
        peer: str,
        ended: Callable[[], str],
        stream: bool,
        api: str,
    ) -> None:
        self.core, self.request, self.rpc, self.peer, self.ended = core, request, rpc, peer, ended
        self.stream, self.api = stream, api
        self.t0 = time.perf_counter()
        self.label, self.status = UNRESOLVED, "ok"
        self.manifests: list[Manifest] = []
        self.handle: RequestHandle | None = None
        self.result: Result | None = None

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(err, HotswapError):
            self.status = mapping_for(err).grpc_status.lower()
        elif isinstance(err, GeneratorExit | asyncio.CancelledError):  # the client went away
            self.left()
        elif err is not None:
            self.status = "internal"
        self.core.record(self)

    def left(self) -> None:
        """The client ended the call (cancel or deadline): free the row at the next step."""
        self.status = self.ended()
        if self.handle is not None:
            self.handle.cancel()

    @property
    def refs(self) -> list[str]:
        """The request's adapters as exact versions, once authorized."""
        return [m.ref for m in self.manifests]

    def authorize(self, metadata: Metadata) -> list[Manifest]:
        """Authenticate the caller and authorize it for each adapter ref, resolving each (the one resolve)."""
        principal = self.core.principal(metadata)
        self.manifests = [authorize(self.core.registry, principal, a.ref) for a in self.request.adapters]
        self.label = self.core.metrics.adapter_label(self.refs)
        return self.manifests

    def submit(self) -> RequestHandle:
        """Submit the engine request, with the manifests :meth:`authorize` resolved."""
        self.handle = self.core.ready.submit(to_request(self.request, self.refs), self.manifests)
        return self.handle

    def chunk(self, delta: Delta) -> pb.GenerateChunk:
        """The stream's chunk for ``delta`` (from the handle): its token ids and text."""
        assert self.stream, "chunks are for streaming calls"
        return pb.GenerateChunk(token_ids=delta.token_ids, text=delta.text)

    def final(self, result: Result, merge_rest: bool = False) -> list[pb.GenerateChunk]:
        """The last chunks: the response, after any text held back (in the same chunk with ``merge_rest``)."""
        self.result = result
        response = to_response(result)
        if not self.stream:
            return [pb.GenerateChunk(response=response)]
        assert self.handle is not None, "a final answer follows submit"
        rest = self.handle.rest
        if merge_rest:
            return [pb.GenerateChunk(text=rest, response=response)]
        return [*([pb.GenerateChunk(text=rest)] if rest else []), pb.GenerateChunk(text="", response=response)]


_OPTIONAL = ("max_new_tokens", "top_p", "seed", "rank")  # GenerateRequest's fields with presence, as in Request


def to_request(msg: pb.GenerateRequest, exact_refs: list[str]) -> Request:
    """The engine request for ``msg``, with its adapters already resolved (and authorized) to exact refs; what
    ``msg`` leaves unset (an optional field, an adapter's weight) takes the default of :class:`Request`."""
    adapters = [
        (ref, a.weight) if a.HasField("weight") else ref for ref, a in zip(exact_refs, msg.adapters, strict=True)
    ]
    optional = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    return Request(
        prompt=msg.prompt or None,
        prompt_ids=list(msg.prompt_ids) or None,
        messages=[{"role": m.role, "content": m.content} for m in msg.messages] or None,
        adapters=adapters,
        temperature=msg.temperature,
        top_k=msg.top_k,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        **optional,
    )


def to_response(result: Result) -> pb.GenerateResponse:
    t = result.timings
    return pb.GenerateResponse(
        text=result.text or "",
        token_ids=result.token_ids,
        finish_reason=FINISH_TO_PB[result.finish_reason],
        usage=pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
        timings=pb.Timings(queue_seconds=t.queue_s, time_to_first_token_seconds=t.ttft_s, total_seconds=t.total_s),
        adapters=[pb.WeightedAdapter(ref=ref, weight=w) for ref, w in result.adapters],
    )
