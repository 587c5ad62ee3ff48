"""A submitted request: the handle its caller holds, its checks (:func:`make_job`), and the engine's state of it
while it waits and runs.

The engine thread reports through the handle's public :meth:`RequestHandle.push`, :meth:`~RequestHandle.finish`
and :meth:`~RequestHandle.fail`; the caller reads on its own thread (tokens and their text in order, then the end).
The handle's :class:`Detokenizer` is the request's one: it finds the stop strings, makes the stream's text deltas
and the result's text.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hotswap.basemodel import encode_prompt
from hotswap.devices import torch_dtype
from hotswap.errors import CapacityExceeded, HotswapError, InvalidArgument
from hotswap.methods import registered
from hotswap.registry import Manifest, Registry
from hotswap.registry.registry import check_base
from hotswap.serve.engine.chat import render as render_chat
from hotswap.serve.engine.config import EngineConfig
from hotswap.serve.engine.detok import Detokenizer
from hotswap.serve.engine.sampling import RowSampler
from hotswap.serve.engine.types import FinishReason, Request, Result, Timings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Delta:
    """A piece of a request's stream: tokens generated since the previous piece, and the text that became safe to
    send with them (never a partial character, nor what may still become a stop string)."""

    token_ids: list[int]
    text: str


class RequestHandle:
    """A submitted request: iterate for token ids as they come, :meth:`next_delta` for tokens with their text,
    ``result()`` to wait, ``cancel()``."""

    def __init__(self, detok: Detokenizer) -> None:
        self._detok = detok
        self._events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: HotswapError | None = None
        self._rest = ""
        self.cancelled = False

    def __iter__(self) -> Iterator[int]:
        while (delta := self.next_delta()) is not None:
            yield from delta.token_ids

    def next_delta(self) -> Delta | None:
        """Wait for the next token, and take every token already produced after it too (a slow reader gets them
        in one piece), with their text; None once the request has finished. Raises the request's error."""
        tokens: list[int] = []
        texts: list[str] = []
        block = True
        while True:
            try:
                kind, value = self._events.get(block=block)
            except queue.Empty:
                return Delta(tokens, "".join(texts))
            if kind == "token":
                token, text = value  # type: ignore[misc]
                tokens.append(token)
                texts.append(text)
                block = False
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                self._events.put((kind, value))  # keep the end for the next call
                return Delta(tokens, "".join(texts)) if tokens else None

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError("request still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @property
    def rest(self) -> str:
        """The end of the result's text that no delta carried, held back until the request finished ("" before)."""
        return self._rest

    def cancel(self) -> None:
        """Leave the batch at the next step (finish_reason 'cancelled'); its row and slots are freed."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- the engine's side ---------------------------------------------------------------------------
    def push(self, token: int) -> bool:
        """One more generated token for the reader, with the text it makes safe to send; True once a stop string
        occurs in the text (the request ends on this token)."""
        assert not self.done, "a finished request gets no more tokens"
        self._events.put(("token", (token, self._detok.feed(token))))
        return self._detok.stopped

    def final_text(self) -> str | None:
        """The text of every token pushed, cut before the stop strings; None without a tokenizer."""
        return self._detok.final_text()

    def finish(self, result: Result) -> None:
        """The request ended normally (stop, length or cancelled) with ``result`` (its text is :meth:`final_text`)."""
        self._rest = self._detok.rest(result.text or "")
        self._end(result, None)

    def fail(self, error: HotswapError) -> None:
        """The request ended with ``error``; the reader gets it after the tokens already pushed."""
        self._end(None, error)

    def _end(self, result: Result | None, error: HotswapError | None) -> None:
        assert not self.done, "a request ends once"
        self._result, self._error = result, error
        self._events.put(("error", error) if error else ("done", None))
        self._done.set()


@dataclass(eq=False)  # a job is itself: found in the queue and rows by identity
class Job:
    """The engine's state of one request, from submit until it ends."""

    req: Request
    prompt_ids: list[int]
    adapters: list[tuple[str, float]]  # exact refs ("name@3") and weights
    handle: RequestHandle
    sampler: RowSampler
    submitted: float
    row: int = -1
    slots: list[tuple[int, float]] = field(default_factory=list)
    position: int = 0  # next cache position to write
    cache_end: int = 0  # cache positions [0, cache_end) of the row may hold this job's keys/values
    generated: list[int] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    # set when bound to a row (again after a preemption, which frees the row and recomputes)
    prefill_end: int = 0  # cache positions [0, prefill_end) are context + prompt (+ what was generated before)
    chunk: int = 0  # tokens the next prefill step feeds (chunked prefill)
    digests: list[bytes] = field(default_factory=list)  # prefix caching: the full blocks of the row's sequence
    admitted: int = 0  # admission order: a preemption takes the youngest row
    preemptions: int = 0

    @property
    def text_ids(self) -> list[int]:
        """The tokens a (re)started row prefills: the prompt and anything generated before a preemption."""
        return self.prompt_ids + self.generated

    @property
    def prefilling(self) -> bool:
        return self.position < self.prefill_end

    def finish(self, reason: FinishReason) -> None:
        """End the request with its result; its row must be free already."""
        self.timings.total_s = time.perf_counter() - self.submitted
        result = Result(
            token_ids=list(self.generated),
            text=self.handle.final_text(),
            finish_reason=reason,
            timings=self.timings,
            prompt_tokens=len(self.prompt_ids),
            adapters=list(self.adapters),
        )
        self.handle.finish(result)


def _resolve_adapters(
    request: Request,
    config: EngineConfig,
    registry: Registry,
    base_fingerprint: str,
    manifests: Sequence[Manifest] | None,
) -> list[tuple[str, float]]:
    """The request's adapters as exact refs with weights, checked against their base and what their methods allow.
    ``manifests``: the adapters already resolved (else each is resolved here)."""
    methods = registered()
    ranked = "/".join(spec.display for spec in methods.values() if spec.ranked)
    top = float(torch.finfo(torch_dtype(config.dtype)).max)
    weighted = request.weighted_adapters()
    if manifests is not None and [m.ref for m in manifests] != [ref for ref, _ in weighted]:
        raise ValueError("manifests must be those of the request's adapters, given as exact refs, in order")
    adapters, context = [], 0
    for i, (ref, weight) in enumerate(weighted):
        if abs(weight) > top:
            raise InvalidArgument(f"adapter weight for {ref} must be within ±{top:g} ({config.dtype})")
        manifest = check_base(manifests[i] if manifests is not None else registry.resolve(ref), base_fingerprint)
        spec = methods.get(manifest.method)  # an unknown method is refused when it loads
        if spec is not None and spec.context:  # it changes the row's context: one per request, weight 1
            context += 1
            if weight != 1.0:
                raise InvalidArgument(f"{manifest.ref} ({manifest.method}) cannot be weighted; use weight 1")
        if request.rank is not None and not (spec is not None and spec.ranked):
            raise InvalidArgument(f"rank applies to {ranked} adapters only; {manifest.ref} is {manifest.method}")
        adapters.append((manifest.ref, weight))
    if request.rank is not None and not adapters:
        raise InvalidArgument(f"rank applies to {ranked} adapters only; this request uses the base model")
    if context > 1:
        names = "/".join(name for name, spec in methods.items() if spec.context)
        raise InvalidArgument(f"a request can use at most one adapter that changes its context ({names})")
    return adapters


def make_job(
    request: Request,
    config: EngineConfig,
    registry: Registry,
    base_fingerprint: str,
    vocab: int,
    tokenizer: PreTrainedTokenizerBase | None,
    bos_id: int | None,
    manifests: Sequence[Manifest] | None = None,
) -> Job:
    """Validate and resolve a request for this base (adapter refs -> exact versions, unless ``manifests`` has them
    resolved already), before it is queued."""
    if len(request.adapters) > config.max_adapters_per_request:
        raise InvalidArgument(f"at most {config.max_adapters_per_request} adapters per request")
    if any(t >= vocab for t in request.stop_token_ids):
        raise InvalidArgument(f"stop_token_ids must be below the vocabulary size {vocab}")
    adapters = _resolve_adapters(request, config, registry, base_fingerprint, manifests)
    if len({ref for ref, _ in adapters}) > config.max_resident:
        raise CapacityExceeded(f"a request can use at most max_resident={config.max_resident} adapters")
    if (request.stop or request.prompt is not None) and tokenizer is None:
        raise InvalidArgument("text prompts and stop strings need a base with a tokenizer; send prompt_ids")
    if request.prompt_ids is not None:
        prompt_ids = list(request.prompt_ids)
    elif request.messages is not None:
        prompt_ids = render_chat(tokenizer, request.messages)
    else:
        assert tokenizer is not None and request.prompt is not None  # checked just above, and by Request
        prompt_ids = encode_prompt(tokenizer, request.prompt, bos_id)
    if max(prompt_ids) >= vocab:
        raise InvalidArgument(f"prompt_ids contains {max(prompt_ids)}, outside the vocabulary (size {vocab})")
    if len(prompt_ids) + request.max_new_tokens > config.max_seq_len:
        raise InvalidArgument(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds "
            f"max_seq_len {config.max_seq_len}"
        )
    return Job(
        req=request,
        prompt_ids=prompt_ids,
        adapters=adapters,
        handle=RequestHandle(Detokenizer(tokenizer, request.stop)),
        sampler=RowSampler(request.temperature, request.top_k, request.top_p, request.seed),
        submitted=time.perf_counter(),
    )
