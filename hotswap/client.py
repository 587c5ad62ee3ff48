"""Python client for a ``hotswap serve`` server (sync, with streaming). Imports no torch: a light dependency.

    from hotswap.client import Client
    with Client("127.0.0.1:50051", token="...") as c:
        print(c.generate("2+2=", adapters=["math:prod"], max_new_tokens=8).text)
        for chunk in c.stream("Tell me", adapters=[("tone@2", 0.5)]):
            print(chunk.text, end="")
        c.generate(messages=[{"role": "user", "content": "Hi"}])  # rendered by the base's chat template

Server errors are re-raised as the matching :mod:`hotswap.errors` class (e.g. ``AdapterNotFound``,
``CapacityExceeded``, ``PermissionDenied``), with the server's message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotswap.errors import (
    GRPC_ERROR_KEY,
    HotswapError,
    InvalidAdapterRef,
    InvalidArgument,
    ServerUnavailable,
    error_from_status,
    quote,
)
from hotswap.registry.refs import AdapterRef
from hotswap.v1 import hotswap_pb2 as pb
from hotswap.v1 import hotswap_pb2_grpc as pb_grpc

AdapterArg = str | tuple[str, float]
# gRPC metadata Ray Serve routes by (``hotswap serve --ray``): a request's first adapter ref, sent always
# (a single server ignores it), so replicas that already hold the adapter get its requests.
MODEL_ID_KEY = "multiplexed_model_id"
# the wire's FINISH_REASON_<NAME> as the server's reason, "<name>" ("stop", "length", "cancelled")
_FINISH = {value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()}


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float
    total_s: float
    adapters: list[tuple[str, float]] = field(default_factory=list)  # as resolved, e.g. [("math@2", 1.0)]


@dataclass
class Chunk:
    token_ids: list[int]
    text: str


@dataclass
class AdapterInfo:
    name: str
    latest: int
    versions: list[int]
    aliases: dict[str, int]
    method: str
    visibility: str
    resident: list[str]


# Ray Serve's proxy reports a replica that died mid-request as INTERNAL with Ray's ActorDiedError text; for a
# client it is what UNAVAILABLE means (retry: another or the restarted replica answers), so we raise that.
_RAY_REPLICA_DIED = "The actor died unexpectedly"


def _error(err: grpc.RpcError) -> HotswapError:
    code = err.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INTERNAL and _RAY_REPLICA_DIED in (err.details() or ""):  # type: ignore[attr-defined]
        return ServerUnavailable(f"the replica serving this request died ({err.details()}); retry")  # type: ignore[attr-defined]
    trailing = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return error_from_status(code.name, err.details() or code.name, trailing.get(GRPC_ERROR_KEY))  # type: ignore[attr-defined]


def _generation(resp: pb.GenerateResponse) -> Generation:
    return Generation(
        text=resp.text,
        token_ids=list(resp.token_ids),
        finish_reason=_FINISH.get(resp.finish_reason, _FINISH[pb.FINISH_REASON_UNSPECIFIED]),
        prompt_tokens=resp.usage.prompt_tokens,
        completion_tokens=resp.usage.completion_tokens,
        queue_s=resp.timings.queue_seconds,
        ttft_s=resp.timings.time_to_first_token_seconds,
        total_s=resp.timings.total_seconds,
        adapters=[(a.ref, a.weight) for a in resp.adapters],
    )


class Stream:
    """Iterate for :class:`Chunk` s as tokens are produced; ``response`` holds the final
    :class:`Generation` once the iteration ends; ``cancel()`` stops the request (its row is freed)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.response: Generation | None = None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:
                if msg.HasField("response"):
                    self.response = _generation(msg.response)
                if msg.token_ids or msg.text:
                    yield Chunk(token_ids=list(msg.token_ids), text=msg.text)
        except grpc.RpcError as e:
            raise _error(e) from None

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_ca: str | Path | bytes | None = None,
        timeout: float | None = None,
        tls: bool = False,
        application: str | None = None,
    ) -> None:
        """``target`` "host:port"; ``token`` a bearer token; TLS when ``tls_ca`` (PEM path or bytes) or ``tls``
        (system roots) is given; ``timeout`` the default deadline in seconds of every call; ``application``
        the Ray Serve application to address (only where a Ray cluster runs several)."""
        if tls_ca is not None or tls:
            pem = Path(tls_ca).read_bytes() if isinstance(tls_ca, str | Path) else tls_ca
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=pem))
        else:
            self.channel = grpc.insecure_channel(target)
        self.target, self.timeout = target, timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if application:
            self._metadata += (("application", application),)
        self._inference = pb_grpc.InferenceStub(self.channel)
        self._adapters = pb_grpc.AdaptersStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None, metadata: tuple = ()) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata + metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    @staticmethod
    def _routing(request: pb.GenerateRequest) -> tuple[tuple[str, str], ...]:
        """Ray's routing metadata: the first adapter's ref, only when it is a valid ref (a huge or non-ASCII
        one cannot travel as a header; the server answers INVALID_ARGUMENT for it instead)."""
        if not request.adapters:
            return ()
        ref = request.adapters[0].ref
        try:
            AdapterRef.parse(ref)
        except InvalidAdapterRef:
            return ()
        return ((MODEL_ID_KEY, ref),)

    # -- inference ------------------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **params: Any) -> Generation:
        """Generate to the end. ``params``: see :func:`build_request` (adapters, prompt_ids, sampling...)."""
        request = build_request(prompt, **params)
        return _generation(self._call(self._inference.Generate, request, timeout, self._routing(request)))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **params: Any) -> Stream:
        """Like :meth:`generate`, but returns a :class:`Stream` of chunks."""
        request = build_request(prompt, **params)
        metadata = self._metadata + self._routing(request)
        call = self._inference.GenerateStream(request, timeout=timeout or self.timeout, metadata=metadata)
        return Stream(call)

    # -- administration -------------------------------------------------------------------------------
    def load(self, ref: str, pin: bool = False, timeout: float | None = None) -> tuple[str, float]:
        """Make ``ref`` resident (admin); returns (exact ref, seconds it took)."""
        resp = self._call(self._adapters.Load, pb.LoadRequest(ref=ref, pin=pin), timeout, ((MODEL_ID_KEY, ref),))
        return resp.ref, resp.seconds

    def unload(self, ref: str, timeout: float | None = None) -> str:
        return self._call(self._adapters.Unload, pb.UnloadRequest(ref=ref), timeout).ref

    def list(self, timeout: float | None = None) -> list[AdapterInfo]:
        resp = self._call(self._adapters.List, pb.ListRequest(), timeout)
        return [
            AdapterInfo(a.name, a.latest, list(a.versions), dict(a.aliases), a.method, a.visibility, list(a.resident))
            for a in resp.adapters
        ]

    def describe(self, ref: str, timeout: float | None = None) -> dict[str, Any]:
        """The manifest of ``ref`` as the registry stores it, plus ``resident``."""
        resp = self._call(self._adapters.Describe, pb.DescribeRequest(ref=ref), timeout)
        return {**json.loads(resp.manifest_json), "ref": resp.ref, "resident": resp.resident}

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """``SERVING``, ``NOT_SERVING`` ... of the standard health service."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def build_request(
    prompt: str | None = None,
    *,
    adapters: Sequence[AdapterArg] = (),
    prompt_ids: Sequence[int] | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    rank: int | None = None,
) -> pb.GenerateRequest:
    """A ``GenerateRequest``: ``adapters`` are refs or (ref, weight) pairs; ``messages`` a chat
    (``[{"role": "user", "content": "Hi"}]``) instead of a prompt, rendered by the base's chat template; unset
    fields (None) take the server's defaults."""
    weighted = [
        pb.WeightedAdapter(ref=a) if isinstance(a, str) else pb.WeightedAdapter(ref=a[0], weight=float(a[1]))
        for a in adapters
    ]
    optional = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "rank": rank,
    }
    return pb.GenerateRequest(
        adapters=weighted,
        prompt=prompt or "",
        prompt_ids=list(prompt_ids or ()),
        messages=[_chat_message(i, m) for i, m in enumerate(messages or ())],
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        **{k: v for k, v in optional.items() if v is not None},
    )


def _chat_message(i: int, message: Mapping[str, str]) -> pb.ChatMessage:
    """One chat turn on the wire (the server checks the rest: roles its template knows, sizes)."""
    if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
        raise InvalidArgument(f"messages[{i}] must be a mapping of exactly role and content, got {quote(message)}")
    if not isinstance(message["role"], str) or not isinstance(message["content"], str):
        raise InvalidArgument(f"messages[{i}]: role and content must be strings, got {quote(dict(message))}")
    return pb.ChatMessage(role=message["role"], content=message["content"])
