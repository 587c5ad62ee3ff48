"""The one error tree of hotswap, and the one table mapping it to gRPC status codes and CLI exit codes.

Every package raises these (never bare ``ValueError``/``OSError`` across a package boundary), so the
CLI and the gRPC server translate errors in exactly one place each, from :data:`ERROR_TABLE`.
"""

from __future__ import annotations

from dataclasses import dataclass


class HotswapError(Exception):
    """Base of every error hotswap raises on purpose. ``str(err)`` is a one-line, user-facing message."""


class InvalidArgument(HotswapError):
    """A caller-supplied value is malformed or out of range (the request can be fixed and retried)."""


class InvalidAdapterRef(InvalidArgument):
    """An adapter reference or name does not match the allowed syntax."""


class InvalidArtifact(InvalidArgument):
    """An adapter directory is not a publishable artifact (missing files, pickle weights, bad JSON...)."""


class ArtifactRejected(InvalidArtifact):
    """An artifact does not fit the base it is published for or served on (a tensor the engine cannot place,
    a wrong shape, rank or dtype, a missing or extra tensor, non-finite values). Refused at publish when the
    base is given, and at load (FAILED_PRECONDITION: the stored adapter, not the request, is at fault)."""


class AdapterFault(HotswapError):
    """An adapter failed while serving one request (its logits became NaN/inf, or its part of the forward
    failed): that request ends with this error; every other row of the batch goes on."""


class AdapterNotFound(HotswapError):
    """No adapter, version or alias by that name exists in the registry."""


class VersionExists(HotswapError):
    """A published version is immutable: it cannot be written again."""


class IntegrityError(HotswapError):
    """A stored file no longer matches the sha256/size recorded in its manifest (tampered or truncated)."""


class BaseModelMismatch(HotswapError):
    """The adapter was published for a different base model than the one asked for."""


class InvalidBaseModel(InvalidArgument):
    """A path given as a base model is not a usable checkpoint directory."""


class RegistryUnavailable(HotswapError):
    """The registry storage cannot be reached or used (permissions, missing root, remote down)."""


class UnsupportedAdapter(HotswapError):
    """A valid artifact uses something this engine cannot serve (the message names it)."""


class ServerUnavailable(HotswapError):
    """The server cannot be reached, is still loading its base model, or is shutting down; retry later."""


class EngineClosed(HotswapError):
    """The engine is shut down (or shutting down) and takes no more requests."""


class CapacityExceeded(HotswapError):
    """A bounded resource (queue, resident slots, memory) is full."""


class Unauthenticated(HotswapError):
    """No valid credentials were presented (e.g. a missing or unknown bearer token)."""


class PermissionDenied(HotswapError):
    """The caller is known but may not do this (another tenant's adapter, an admin call without the role)."""


class DeadlineExceeded(HotswapError):
    """The caller's deadline passed before the request finished."""


class Cancelled(HotswapError):
    """The request was cancelled (by its caller)."""


@dataclass(frozen=True)
class ErrorMapping:
    """How one error class surfaces: a gRPC status code name (``grpc.StatusCode[name]``) and a CLI exit code."""

    grpc_status: str
    exit_code: int


# Lookup walks the exception's MRO, so a subclass uses its nearest listed ancestor's row.
# error_from_status() takes the first row with a status, so each status's most general class comes first.
ERROR_TABLE: dict[type[HotswapError], ErrorMapping] = {
    InvalidArgument: ErrorMapping("INVALID_ARGUMENT", 2),
    ArtifactRejected: ErrorMapping("FAILED_PRECONDITION", 16),
    AdapterFault: ErrorMapping("FAILED_PRECONDITION", 17),
    AdapterNotFound: ErrorMapping("NOT_FOUND", 3),
    VersionExists: ErrorMapping("ALREADY_EXISTS", 4),
    IntegrityError: ErrorMapping("FAILED_PRECONDITION", 5),
    BaseModelMismatch: ErrorMapping("FAILED_PRECONDITION", 6),
    ServerUnavailable: ErrorMapping("UNAVAILABLE", 15),
    RegistryUnavailable: ErrorMapping("UNAVAILABLE", 7),
    UnsupportedAdapter: ErrorMapping("FAILED_PRECONDITION", 9),
    CapacityExceeded: ErrorMapping("RESOURCE_EXHAUSTED", 8),
    EngineClosed: ErrorMapping("UNAVAILABLE", 10),
    Unauthenticated: ErrorMapping("UNAUTHENTICATED", 11),
    PermissionDenied: ErrorMapping("PERMISSION_DENIED", 12),
    DeadlineExceeded: ErrorMapping("DEADLINE_EXCEEDED", 13),
    Cancelled: ErrorMapping("CANCELLED", 14),
    HotswapError: ErrorMapping("INTERNAL", 1),
}


# Longest error message sent to a client (gRPC status details travel in metadata, which servers cap at 8 KiB)
# and longest piece of caller input quoted in one.
MAX_MESSAGE_CHARS = 1024
MAX_QUOTE_CHARS = 80


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was: for echoing caller input in errors."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} chars" if isinstance(value, str) else f"{len(text)} chars as text"
    return f"{text[: limit - 1]}… ({size})"


def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message bounded to ``limit`` characters, on one line."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# gRPC trailing-metadata key under which the server names the error class, so clients re-raise that class.
GRPC_ERROR_KEY = "hotswap-error"


def mapping_for(err: HotswapError) -> ErrorMapping:
    """The table row for ``err`` (its own class, else the nearest ancestor's)."""
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    raise TypeError(f"{type(err).__name__} is not a HotswapError")


def _subclasses(cls: type[HotswapError]) -> list[type[HotswapError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


def error_from_status(status: str, message: str, name: str | None = None) -> HotswapError:
    """Rebuild a remote error: the class named ``name`` if it is ours, else the class a ``"ClassName: "``
    message prefix names (Ray Serve's proxy drops trailing metadata on errors, so replicas put it
    there), else the first class with ``status``."""
    by_name = {cls.__name__: cls for cls in _subclasses(HotswapError)}
    if name in by_name:
        return by_name[name](message)
    head, sep, rest = message.partition(": ")
    if name is None and sep and head in by_name:
        return by_name[head](rest)
    for cls, mapping in ERROR_TABLE.items():
        if mapping.grpc_status == status:
            return cls(message)
    return HotswapError(f"{status}: {message}")
