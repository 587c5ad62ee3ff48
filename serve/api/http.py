"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) beside the gRPC server, over the same servicer core: the
same engine, tenants (``Authorization: Bearer``, the same tokens file), errors and metrics (``api="http"``).

- ``GET /v1/models``: the base (:attr:`ServerConfig.model_name`) and every adapter the caller may use.
- ``POST /v1/completions``, ``POST /v1/chat/completions``: ``model`` is the base's name or an adapter ref; the
  body's format is :mod:`hotswap.serve.api.http_api`. ``stream`` answers Server-Sent Events ending ``data: [DONE]``.
- ``GET /health``: 200 while serving, 503 while loading, draining or unhealthy; ``GET /metrics`` optionally.

The calls are :class:`HttpCore`'s, on a :class:`~hotswap.serve.api.servicer.Servicer`: the single server's
(:class:`LocalBackend`, admitted and drained with its gRPC calls) or a Ray replica's (:mod:`hotswap.serve.api.scaleout`,
behind a FastAPI ingress deployment). An answer is a :class:`Head` then its body; the head waits for the first
token, so a request that fails before any (a bad value, an unknown adapter, a full queue, a corrupt artifact)
gets its own status: :func:`hotswap.serve.api.status.http_error`. A stream that fails later ends with an error event.
A client that goes away ends its generation: the row leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from hotswap.errors import HotswapError, ServerUnavailable
from hotswap.registry import AdapterRef
from hotswap.serve.api.http_api import Body, ChatBody, CompletionBody, Reply, generate_request
from hotswap.serve.api.servicer import Generation, Metadata, Servicer, Visible
from hotswap.serve.api.status import HTTP_STATUS, error_body, http_error

log = logging.getLogger(__name__)
T = TypeVar("T")
SSE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
INTERNAL = "internal error; see the server log"


@dataclass(frozen=True)
class Head:
    """How an answer starts: its status, headers, and whether an event stream follows (else one JSON body)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False


Part = Head | bytes  # an answer: a Head, then bytes
Prepare = Callable[[Generation], Awaitable[dict[str, str]]]


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _event(obj: object) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def error_parts(err: HotswapError, streaming: bool = False) -> list[Part]:
    """``err`` as an answer; once a stream has started, as its last event."""
    status, body, headers = http_error(err)
    return [_event(body)] if streaming else [Head(status, headers), _json(body)]


def _metadata(authorization: str | None) -> Metadata:
    return (("authorization", authorization),) if authorization else ()


def _unix(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


class HttpCore:
    """The HTTP API's calls on one servicer core. Blocking work (registry reads, waiting for tokens) runs on
    ``executor`` (None: the event loop's default); ``prepare`` runs between authorizing a generation and
    submitting it (a Ray replica routes and loads there) and returns headers for the answer."""

    def __init__(
        self,
        core: Servicer,
        base: Path,
        model_name: str,
        executor: Executor | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        self.core, self.model_name, self.executor, self.prepare = core, model_name, executor, prepare
        self.created = int((Path(base) / "config.json").stat().st_mtime)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def models(self, authorization: str | None) -> list[Part]:
        """``GET /v1/models``: the base, then the adapters the caller may see (another tenant's private ones are
        absent), one entry per adapter with hotswap's fields besides OpenAI's."""
        try:
            visible = await self._run(self.core.visible, _metadata(authorization))
        except HotswapError as e:
            return error_parts(e)
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "public"}
        models = [{**base, "root": self.model_name, "parent": None}, *(self._model(v) for v in visible)]
        return [Head(200), _json({"object": "list", "data": models})]

    def _model(self, v: Visible) -> dict[str, Any]:
        s = v.summary
        owner = AdapterRef.parse(s.name).tenant or "public"
        return {
            "id": s.name,
            "object": "model",
            "created": _unix(s.created_at),
            "owned_by": owner,
            "root": s.name,
            "parent": self.model_name,
            "method": s.method,
            "latest": s.latest,
            "versions": v.versions,
            "aliases": s.aliases,
            "visibility": s.visibility,
            "resident": v.resident,
        }

    async def generate(self, body: Body, authorization: str | None, peer: str) -> AsyncIterator[Part]:
        """A completion or chat completion: the Head once the first token (or the error) is there, then the body."""
        reply = Reply(body)
        streaming = False
        try:
            msg = generate_request(body, self.model_name)
            with self.core.generation(msg, reply.rpc, peer, stream=body.stream, api="http") as g:
                await self._run(g.authorize, _metadata(authorization))
                headers = await self.prepare(g) if self.prepare is not None else {}
                handle = await self._run(g.submit)
                if body.stream:
                    delta = await self._run(handle.next_delta)  # the request's error, if any, comes before the head
                    yield Head(200, headers, stream=True)
                    streaming = True
                    while delta is not None:
                        yield _event(reply.chunk(g.chunk(delta)))
                        delta = await self._run(handle.next_delta)
                (last,) = g.final(await self._run(handle.result), merge_rest=True)
            if not body.stream:
                yield Head(200, headers)
                yield _json(reply.whole(last.response))
                return
            for chunk in reply.last(last):
                yield _event(chunk)
            yield DONE
        except HotswapError as e:
            for part in error_parts(e, streaming):
                yield part
        except Exception:  # a bug: logged, answered 500 (the generation was recorded as internal)
            log.exception("%s failed", reply.rpc)
            body_ = error_body(INTERNAL, HTTP_STATUS["INTERNAL"][1], "internal")
            for part in [_event(body_)] if streaming else [Head(500), _json(body_)]:
                yield part


class Backend(Protocol):
    """What the app calls: a core of its own (:class:`LocalBackend`) or the Ray replicas behind an ingress."""

    def models(self, authorization: str | None) -> Awaitable[list[Part]]: ...

    def generate(self, body: Body, authorization: str | None, peer: str) -> AsyncIterator[Part]: ...

    def health(self) -> Awaitable[bool]: ...


class LocalBackend:
    """The single server's: :class:`HttpCore` on its own core, each call admitted (``admit`` raises while loading
    or draining) and counted in flight until its answer has been sent (``leave``), as the gRPC calls are."""

    def __init__(
        self, http: HttpCore, admit: Callable[[], None], leave: Callable[[], None], serving: Callable[[], bool]
    ) -> None:
        self.http, self.admit, self.leave, self.serving = http, admit, leave, serving

    async def models(self, authorization: str | None) -> list[Part]:
        try:
            self.admit()
        except HotswapError as e:
            return error_parts(e)
        try:
            return await self.http.models(authorization)
        finally:
            self.leave()

    async def generate(self, body: Body, authorization: str | None, peer: str) -> AsyncIterator[Part]:
        try:
            self.admit()
        except HotswapError as e:
            for part in error_parts(e):
                yield part
            return
        try:
            async with contextlib.aclosing(self.http.generate(body, authorization, peer)) as parts:
                async for part in parts:
                    yield part
        finally:
            self.leave()

    async def health(self) -> bool:
        return self.serving()


class _Stream(StreamingResponse):
    """An event stream that closes its source however it ends (a client that went away included), so the
    generation ends at once and its row leaves the batch at the next step."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _gone(request: HttpRequest) -> None:
    """Return once the client has disconnected (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(parts: AsyncIterator[Part], request: HttpRequest) -> Response:
    """The response of ``parts``; a client that goes away before the head (waiting in the queue, or for a whole
    non-streamed answer) cancels the generation."""
    first = asyncio.ensure_future(anext(parts))
    gone = asyncio.ensure_future(_gone(request))
    try:
        await asyncio.wait((first, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not first.done():
            first.cancel()  # the generation sees it and ends: its row leaves the batch
            await asyncio.wait((first,))
    if first.cancelled():
        return Response(status_code=499)  # nobody reads it
    head = first.result()
    assert isinstance(head, Head), "an answer starts with its head"
    if head.stream:
        return _Stream(parts, head.status, head.headers, media_type=SSE)
    body = b"".join([p async for p in parts if isinstance(p, bytes)])
    return Response(body, head.status, head.headers, media_type="application/json")


def _parts_response(parts: list[Part]) -> Response:
    head, *rest = parts
    assert isinstance(head, Head)
    return Response(b"".join(p for p in rest if isinstance(p, bytes)), head.status, head.headers,
                    media_type="application/json")  # fmt: skip


def _invalid(request: HttpRequest, exc: Exception) -> Response:
    """A body that is not JSON, or a field of the wrong type or range: 400 naming the field."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for e in exc.errors():
        if e["type"] == "json_invalid":
            problems.append(f"not JSON ({e.get('ctx', {}).get('error', e['msg'])} at character {e['loc'][-1]})")
            continue
        where = ".".join(str(x) for x in e["loc"][1:])
        problems.append(f"{where}: {e['msg']}" if where else e["msg"])
    message = "invalid request body: " + "; ".join(dict.fromkeys(problems))
    return JSONResponse(error_body(message, HTTP_STATUS["INVALID_ARGUMENT"][1], "invalid_argument"), 400)


def _http_exception(request: HttpRequest, exc: Exception) -> Response:
    """Starlette's own answers (no such route, wrong method) in the same error format."""
    assert isinstance(exc, HTTPException)
    body = error_body(str(exc.detail), "invalid_request_error", "not_found" if exc.status_code == 404 else "http")
    return JSONResponse(body, exc.status_code, exc.headers)


def build_app(backend: Backend, metrics: CollectorRegistry | None = None) -> FastAPI:
    """The API over ``backend``; ``metrics``: also serve this registry on ``GET /metrics``."""
    app = FastAPI(title="hotswap", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_exception)

    def caller(request: HttpRequest) -> tuple[str | None, str]:
        client = request.client
        return request.headers.get("authorization"), f"{client.host}:{client.port}" if client else "-"

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> Response:
        return _parts_response(await backend.models(caller(request)[0]))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HttpRequest) -> Response:
        return await _answer(backend.generate(body, *caller(request)), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: HttpRequest) -> Response:
        return await _answer(backend.generate(body, *caller(request)), request)

    @app.get("/health")
    async def health() -> Response:
        ok = await backend.health()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, 200 if ok else 503)

    if metrics is not None:

        @app.get("/metrics")
        def prometheus() -> Response:
            return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app


class HttpServer:
    """uvicorn serving ``app`` from a thread of this process, on a socket bound at once (``port`` 0: any free
    one; :attr:`port` is the bound one); ``tls``: (certificate chain, key) PEM files."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: tuple[Path, Path] | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family, backlog=2048)
        except OSError as e:
            raise ServerUnavailable(f"cannot listen on {host}:{port} for HTTP ({e.strerror})") from None
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # hotswap's logging; one line per request comes from the servicer core
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=5,
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="hotswap-http", daemon=True
        )

    def start(self, timeout: float = 30.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServerUnavailable("the HTTP server did not start; see the log")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the port and the idle connections; requests still running get ``timeout_graceful_shutdown``."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self.socket.close()
