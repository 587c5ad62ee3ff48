"""The engine's public request/result types: what users build and what they get back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from hotswap.errors import InvalidArgument, quote
from hotswap.registry import AdapterRef

AdapterSpec = str | tuple[str, float]

MAX_SEED = 2**64 - 1  # a torch.Generator seed (the API's uint64)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_MESSAGES = 1024  # chat turns of one request (their text is bounded by max_seq_len once rendered)
MAX_ROLE_CHARS = 64
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax: dividing by them overflows the logits


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(field: str, value: object, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):  # type: ignore[operator]
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidArgument(f"{field} must be an integer {bound}, got {quote(value)}")


def _check_number(field: str, value: object, low: float, high: float | None = None) -> None:
    try:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        ok = False
    if not ok or value < low or (high is not None and value > high):  # type: ignore[operator]
        bound = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise InvalidArgument(f"{field} must be a finite number {bound}, got {quote(value)}")


def check_messages(messages: list[dict[str, str]]) -> None:
    """Chat messages: 1-MAX_MESSAGES dicts of exactly a non-empty ``role`` and a string ``content``."""
    if not 0 < len(messages) <= MAX_MESSAGES:
        raise InvalidArgument(f"messages: give 1-{MAX_MESSAGES} messages, got {len(messages)}")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgument(f"{where} must be a dict of role and content, got {type(message).__name__}")
        if set(message) != {"role", "content"}:
            keys = sorted(map(str, message))
            raise InvalidArgument(f"{where} must have exactly the keys role and content, got {quote(keys)}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not 0 < len(role) <= MAX_ROLE_CHARS:
            raise InvalidArgument(f"{where}.role must be a string of 1-{MAX_ROLE_CHARS} characters, got {quote(role)}")
        if not isinstance(content, str):
            raise InvalidArgument(f"{where}.content must be a string, got {type(content).__name__}")


@dataclass(frozen=True)
class Request:
    """One generation request. Exactly one of ``prompt`` (text; needs a tokenizer), ``prompt_ids`` and
    ``messages`` (a chat, ``[{"role": "user", "content": "Hi"}]``, rendered by the base tokenizer's chat template
    with the assistant's turn opened; needs a base whose tokenizer has one).

    ``adapters``: ``[]`` for the base model, ``["math@2"]`` for one adapter, or a weighted list
    ``[("math@2", 1.0), ("tone:prod", 0.5)]``; the row's delta is the weighted sum of the adapters' deltas.
    """

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    adapters: list[AdapterSpec] = field(default_factory=list)
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy (and so is anything below GREEDY_BELOW, its limit)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # sampling seed; same seed + same input -> same output, whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); not part of the output
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides the model's eos
    ignore_eos: bool = False  # benchmarks: generate exactly max_new_tokens
    rank: int | None = None  # serve the adapters truncated to this rank (methods trained at nested ranks)

    def __post_init__(self) -> None:
        """Check every field before the request can reach a batch; each refusal names its field."""
        for name in ("prompt_ids", "messages", "stop", "stop_token_ids", "adapters"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) and not (name in ("prompt_ids", "messages") and value is None):
                raise InvalidArgument(f"{name} must be a list, got {type(value).__name__}")
        if sum(x is not None for x in (self.prompt, self.prompt_ids, self.messages)) != 1:
            raise InvalidArgument("give exactly one of prompt (text), prompt_ids and messages (a chat)")
        if self.prompt_ids is not None and (
            not self.prompt_ids or not all(_is_int(t) and t >= 0 for t in self.prompt_ids)
        ):
            raise InvalidArgument("prompt_ids must be a non-empty list of non-negative token ids")
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt):
            raise InvalidArgument("prompt must be a non-empty string")
        if self.messages is not None:
            check_messages(self.messages)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_number("temperature", self.temperature, 0.0)
        _check_int("top_k", self.top_k, 0)
        _check_number("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0:
            raise InvalidArgument("top_p must be in (0, 1], got 0")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if self.rank is not None:
            _check_int("rank", self.rank, 1, 2**31 - 1)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
                raise InvalidArgument(f"stop: each stop string must have 1-{MAX_STOP_CHARS} characters, got {quote(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS}, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0)
        for spec in self.adapters:
            if not isinstance(spec, str) and not (isinstance(spec, tuple | list) and len(spec) == 2):
                raise InvalidArgument(f"adapters: each entry is a ref or a (ref, weight) pair, got {quote(spec)}")
            ref = spec if isinstance(spec, str) else spec[0]
            AdapterRef.parse(ref)
            if not isinstance(spec, str):
                # weights reach the batch as float32: anything larger would overflow there
                _check_number(f"adapter weight for {ref}", spec[1], -FLOAT32_MAX, FLOAT32_MAX)

    def weighted_adapters(self) -> list[tuple[str, float]]:
        return [(a, 1.0) if isinstance(a, str) else (a[0], float(a[1])) for a in self.adapters]


class FinishReason(StrEnum):
    """Why a request ended."""

    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # its caller cancelled it


@dataclass
class Timings:
    """Seconds, measured by the engine with ``time.perf_counter``."""

    queue_s: float = 0.0  # submit -> first scheduled (includes waiting for a cold adapter)
    ttft_s: float = 0.0  # submit -> first token
    total_s: float = 0.0  # submit -> finished
    token_times_s: list[float] = field(default_factory=list)  # submit -> each token


@dataclass
class Result:
    token_ids: list[int]
    text: str | None  # None when the base has no tokenizer
    finish_reason: FinishReason
    timings: Timings
    prompt_tokens: int = 0
    adapters: list[tuple[str, float]] = field(default_factory=list)  # as resolved: ("math@2", 1.0)


class EngineObserver:
    """Hooks the engine calls as things happen; these defaults do nothing (the server's metrics override them).

    Called from the engine and loader threads, sometimes with the engine's lock held: keep them quick.
    """

    def adapter_loaded(self, source: str, seconds: float) -> None:
        """An adapter became ready: source ``registry`` (fetch + verify + parse) or ``host`` (RAM -> slot)."""

    def cache_event(self, tier: str, event: str) -> None:
        """tier ``resident`` or ``host``; event ``hit``, ``miss`` or ``eviction``."""

    def step(self, batch_size: int) -> None:
        """One decode step ran over ``batch_size`` rows."""

    def kv_blocks(self, used: int, free: int) -> None:
        """After a step: KV cache blocks holding rows' keys/values, and free ones (cached-unreferenced count free)."""

    def prefix_hit(self, adapters: list[tuple[str, float]], tokens: int) -> None:
        """A request reused ``tokens`` cached prompt positions under its serving key (its exact adapters)."""

    def preempted(self) -> None:
        """A running row gave its KV blocks up (cache full) and was queued again, to be recomputed."""

    def health(self, healthy: bool) -> None:
        """The engine turned unhealthy (steps keep failing for no request's fault) or healthy again."""
