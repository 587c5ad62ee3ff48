"""Our errors as gRPC statuses, in one place for each transport: :class:`ErrorInterceptor` on the gRPC server,
:func:`ray_errors` around the Ray replica's methods; and as HTTP statuses with OpenAI-style bodies
(:func:`http_error`, for :mod:`hotswap.serve.api.http`). Servicer methods raise; they catch nothing.

The code comes from :data:`hotswap.errors.ERROR_TABLE` (:func:`status_of`), the message is the error's, bounded
by :func:`~hotswap.errors.clip_message` (details travel in metadata), and the error's class travels with it so the
Python client re-raises that class: in trailing metadata ``hotswap-error`` on the gRPC server, as a
``ClassName: `` prefix of the details on Ray (whose proxy drops trailing metadata on errors).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from hotswap.errors import GRPC_ERROR_KEY, HotswapError, clip_message, mapping_for

F = TypeVar("F", bound=Callable[..., Any])


def _class_of(err: HotswapError) -> type[HotswapError]:
    """``err``'s class among ours (not a wrapper's, e.g. Ray's exception around a replica's)."""
    return next(c for c in type(err).__mro__ if c.__module__ == HotswapError.__module__)


def status_of(err: HotswapError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The gRPC status of ``err`` and the trailing metadata naming its class (the client re-raises it)."""
    return grpc.StatusCode[mapping_for(err).grpc_status], ((GRPC_ERROR_KEY, _class_of(err).__name__),)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Ends a call of ``services`` that raised: a :class:`HotswapError` with its status; anything else is a bug,
    logged to ``log`` with its traceback and answered INTERNAL."""

    def __init__(self, services: tuple[str, ...], log: logging.Logger) -> None:
        self.prefixes, self.log = tuple(f"/{s}/" for s in services), log

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        name = details.method.rsplit("/", 1)[-1]
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}  # fmt: skip
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(name, handler.unary_unary), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(name, handler.unary_stream), **codec)
        return handler  # hotswap.v1 has no client-streaming calls

    def _unary(self, name: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as e:
                self._abort(name, context, e)

        return call

    def _stream(self, name: str, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as e:  # not GeneratorExit: a client that went away gets no status
                self._abort(name, context, e)

        return call

    def _abort(self, name: str, context: grpc.ServicerContext, err: Exception) -> NoReturn:
        if isinstance(err, HotswapError):
            code, trailing = status_of(err)
            context.set_trailing_metadata(trailing)
            context.abort(code, clip_message(str(err)))
        self.log.error("%s failed", name, exc_info=err)
        context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        raise AssertionError("unreachable")  # context.abort raises


def ray_errors(method: F) -> F:
    """Wrap a Ray replica's RPC method (a coroutine or an async generator, taking ``grpc_context``): a
    :class:`HotswapError` it raises leaves with its status set on the context, its class in the details."""

    def set_status(context: Any, err: HotswapError) -> None:
        code, trailing = status_of(err)
        context.set_code(code)
        context.set_details(f"{trailing[0][1]}: {clip_message(str(err))}")  # Ray's proxy answers with these

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, grpc_context):
                    yield item
            except HotswapError as e:
                set_status(grpc_context, e)
                raise

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, grpc_context: Any) -> Any:
        try:
            return await method(self, request, grpc_context)
        except HotswapError as e:
            set_status(grpc_context, e)
            raise

    return unary  # type: ignore[return-value]


# -- HTTP (the OpenAI-compatible API, hotswap.serve.api.http) -------------------------------------------------------
# The HTTP status and OpenAI error ``type`` of each gRPC status, so of each error class through ERROR_TABLE.
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "FAILED_PRECONDITION": (409, "conflict_error"),  # another base's adapter, a corrupt or rejected artifact
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "INTERNAL": (500, "server_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
RETRY_AFTER_SECONDS = 1  # what a 429 (queue full) or 503 (loading, draining) tells clients to wait


def error_body(message: str, kind: str, code: str) -> dict[str, Any]:
    """An OpenAI-style error body: ``{"error": {"message", "type", "code", "param"}}``."""
    return {"error": {"message": clip_message(message), "type": kind, "code": code, "param": None}}


def http_error(err: HotswapError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, OpenAI-style body, headers) of ``err``; the body's ``code`` names its class in snake case
    (``adapter_not_found``), as gRPC's trailing metadata does."""
    status, kind = HTTP_STATUS[mapping_for(err).grpc_status]
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    code = re.sub(r"(?<!^)(?=[A-Z])", "_", _class_of(err).__name__).lower()
    return status, error_body(str(err), kind, code), headers
