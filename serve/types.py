"""The engine's public request/result types: what users build and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field

from hotswap.errors import InvalidArgument
from hotswap.registry import AdapterRef

AdapterSpec = str | tuple[str, float]


@dataclass(frozen=True)
class Request:
    """One generation request. Exactly one of ``prompt`` (text; needs a tokenizer) and ``prompt_ids``.

    ``adapters``: ``[]`` for the base model, ``["math@2"]`` for one adapter, or a weighted list
    ``[("math@2", 1.0), ("tone:prod", 0.5)]``; the row's delta is the weighted sum of the adapters' deltas.
    """

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    adapters: list[AdapterSpec] = field(default_factory=list)
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # sampling seed; same seed + same input -> same output, whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); not part of the output
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides the model's eos
    ignore_eos: bool = False  # benchmarks: generate exactly max_new_tokens
    rank: int | None = None  # DyLoRA: serve the adapters truncated to this rank

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise InvalidArgument("give exactly one of prompt (text) and prompt_ids")
        if self.prompt_ids is not None and (
            not self.prompt_ids or not all(isinstance(t, int) and t >= 0 for t in self.prompt_ids)
        ):
            raise InvalidArgument("prompt_ids must be a non-empty list of non-negative token ids")
        if self.prompt is not None and not self.prompt:
            raise InvalidArgument("prompt must not be empty")
        if self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.rank is not None and self.rank < 1:
            raise InvalidArgument(f"rank must be >= 1, got {self.rank}")
        for ref, weight in self.weighted_adapters():
            AdapterRef.parse(ref)
            if weight != weight or weight in (float("inf"), float("-inf")):
                raise InvalidArgument(f"adapter weight for {ref} must be finite, got {weight}")

    def weighted_adapters(self) -> list[tuple[str, float]]:
        return [(a, 1.0) if isinstance(a, str) else (a[0], float(a[1])) for a in self.adapters]


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
    finish_reason: str  # "stop" (eos / stop sequence), "length", "cancelled"
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
