"""The static decode: a decode step whose shapes and tensor addresses are fixed per bucket, so it can be traced
(``torch.compile``) or captured and replayed (CUDA graphs), adapters included.

The eager step (:meth:`Runner.forward <hotswap.serve.model.runner.Runner.forward>`) sizes everything by the live
batch: the rows decoded, the keys read (up to the longest row), the block tables, and each layer's adapter state,
gathered when the batch plan changes. A captured step replays fixed kernels over fixed addresses, so here:

- the batch is padded to a **batch bucket** (1, 2, 4, 8, then multiples of 8 up to ``max_batch``; the engine feeds
  the padding rows position -1, which writes only scratch space) and the keys are read over a **length bucket**
  (the next power of two positions, capped at ``max_seq_len``; the mask hides the rest);
- tokens, positions and the rows' block tables are copied into buffers owned by the bucket before each step;
- each wrapped linear's adapter state (what its slot kinds gathered for the plan) is computed outside the step,
  once per plan change, and handed to the layer as :attr:`MultiAdapterModule.fixed`. Its *layout* (the kinds, the
  state's structure, every tensor's shape and dtype, every plain value) is part of the key: a plan of the same
  layout reuses the step with the new states copied into the captured ones, another layout gets its own step (as
  vLLM captures a graph per batch size with adapters). A state holding anything else (an opaque object) runs eagerly.

Modes (``EngineConfig.decode``): ``static`` runs this step eagerly (what a capture replays; the CPU tests compare
it with the eager step), ``compile`` traces it with ``torch.compile`` (one graph per key, no graph breaks), and
``cuda-graphs`` captures one CUDA graph per key, sharing one memory pool, at most :data:`MAX_GRAPHS` kept (least
recently used dropped). Logit and context kinds stay outside the step (they run before and after it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hotswap.devices import DECODE_CHOICES
from hotswap.errors import InvalidArgument
from hotswap.serve.model.attention import model_logits
from hotswap.serve.model.kvcache import PagedCache, StaticCache
from hotswap.serve.model.layers import MultiAdapterExperts, MultiAdapterModule

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # captured steps kept (cuda-graphs): each holds its own copy of the adapter states


class OpaqueState(TypeError):
    """An adapter state that is not made of tensors, plain values, tuples, lists, dicts and dataclasses."""


def layout(state: object) -> object:
    """A hashable description of ``state``'s structure: equal layouts can share one captured step."""
    if isinstance(state, torch.Tensor):
        return ("tensor", tuple(state.shape), state.dtype, state.device)
    if state is None or isinstance(state, bool | int | float | str):
        return state
    if isinstance(state, tuple | list):
        return (type(state).__name__, *(layout(s) for s in state))
    if isinstance(state, dict):
        return ("dict", *((k, layout(v)) for k, v in sorted(state.items())))
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return (type(state).__qualname__, *(layout(getattr(state, f.name)) for f in dataclasses.fields(state)))
    raise OpaqueState(f"adapter state of type {type(state).__qualname__}")


def copy_state(dst: object, src: object) -> None:
    """Copy ``src``'s tensors into ``dst``'s, of the same :func:`layout`."""
    if isinstance(dst, torch.Tensor):
        if dst is not src:
            dst.copy_(src)  # type: ignore[arg-type]
    elif isinstance(dst, tuple | list):
        for d, s in zip(dst, src, strict=True):  # type: ignore[call-overload]
            copy_state(d, s)
    elif isinstance(dst, dict):
        for k, d in dst.items():
            copy_state(d, src[k])  # type: ignore[index]
    elif dataclasses.is_dataclass(dst):
        for f in dataclasses.fields(dst):
            copy_state(getattr(dst, f.name), getattr(src, f.name))


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8, and ``max_batch``."""
    sizes = {b for b in (1, 2, 4) if b < max_batch} | set(range(8, max_batch, 8)) | {max_batch}
    return sorted(sizes)


@dataclasses.dataclass
class _Step:
    """One key's buffers; under cuda-graphs also its graph, output, and own copy of the adapter states."""

    tokens: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B,)
    table: torch.Tensor  # the cache's decode table
    states: list[list[tuple[Any, Any]]] | None = None  # per wrapped linear (cuda-graphs: the captured ones)
    epochs: list[int] | None = None  # per wrapped linear, the epoch of the states last copied in
    graph: Any = None
    logits: torch.Tensor | None = None


class StaticDecode:
    """Decode steps of rows [0, n) at fixed shapes and addresses per (batch bucket, length bucket, adapter layout)."""

    def __init__(
        self, model: nn.Module, cache: StaticCache | PagedCache, max_batch: int, max_seq_len: int, mode: str
    ) -> None:
        """``model``: the runner's (its linears wrapped, its attention hotswap's), over ``cache``."""
        self.model, self.cache, self.max_seq_len, self.mode = model, cache, max_seq_len, mode
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        if mode not in DECODE_CHOICES[1:]:
            raise InvalidArgument(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {mode!r}")
        if mode == "cuda-graphs" and self.device.type != "cuda":
            raise InvalidArgument(f"decode 'cuda-graphs' needs a CUDA device, the engine runs on {self.device}")
        self.buckets = batch_buckets(max_batch)
        self.layers = [m for m in model.modules() if isinstance(m, MultiAdapterModule)]
        self.steps: OrderedDict[tuple, _Step] = OrderedDict()
        self._forward: Callable[..., torch.Tensor] = self._step
        if mode == "compile":
            # One trace per key, at most MAX_GRAPHS per engine (then new keys decode eagerly); dynamo's default limit
            # (8 traces of one function per process) would fail the step past 8 keys under fullgraph=True.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * MAX_GRAPHS)
            self._forward = torch.compile(self._step, fullgraph=True, dynamic=False)
        self._pool = torch.cuda.graph_pool_handle() if mode == "cuda-graphs" else None
        # (plan version, layer epochs) -> the layers' layouts (None: an opaque state), for the last ones seen
        self._layouts: tuple[tuple, tuple | None] = ((None,), ())
        self.new_steps = 0  # keys met so far (each traced or captured once)
        self.eager_steps = 0  # steps left to the eager decode (an opaque adapter state)

    def rows(self, n: int) -> int:
        """The batch bucket of ``n`` rows."""
        return next(b for b in self.buckets if b >= n)

    def key_len(self, positions: torch.Tensor) -> int:
        """The length bucket for a step at ``positions`` (host tensor)."""
        need = int(positions.max()) + 1
        return min(1 << max(need - 1, 0).bit_length(), self.max_seq_len)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Like ``Runner.decode`` over rows [0, n), n a batch bucket (host tensors): float logits (n, V), or None when
        an adapter state is opaque (the caller decodes eagerly)."""
        states = [layer.batch_states() if layer.plan.used else [] for layer in self.layers]
        # the layouts change only with the plan or a layer's states: walked once per change, not per step
        seen = (self.layers[0].plan.version, tuple(layer.epoch for layer in self.layers)) if self.layers else ()
        if seen != self._layouts[0]:
            try:
                if self.mode != "static" and any(
                    st and isinstance(layer, MultiAdapterExperts) for layer, st in zip(self.layers, states, strict=True)
                ):  # each expert runs on its own tokens, its adapters too: shapes from the routing, not one graph
                    raise OpaqueState("expert adapters on routed tokens")
                self._layouts = seen, tuple(tuple((k.name, layout(s)) for k, s in st) for st in states)
            except OpaqueState as e:
                self._layouts = seen, None
                log.debug("decoding eagerly: %s", e)
        layouts = self._layouts[1]
        if layouts is None:
            self.eager_steps += 1
            return None
        n, key_len = len(tokens), self.key_len(positions)
        key = (n, key_len, layouts)
        step = self.steps.get(key)
        if step is None and self.mode == "compile" and self.new_steps >= MAX_GRAPHS:
            log.debug("decoding eagerly: %d steps traced already", self.new_steps)  # dynamo keeps every trace
            self.eager_steps += 1
            return None
        step = step or self._new_step(key)
        self.steps.move_to_end(key)
        step.tokens.copy_(tokens, non_blocking=True)
        step.positions.copy_(positions, non_blocking=True)
        step.table.copy_(self.cache.decode_table(n, key_len), non_blocking=True)
        if self.mode != "cuda-graphs":  # traced or eager: the layers' live states are inputs
            return self._with_states(states, lambda: self._forward(step.tokens, step.positions, step.table, key_len))
        if step.states is None:  # captured: the step's own states, refreshed where a layer's changed
            step.states = [[(k, _clone(s)) for k, s in st] for st in states]
            step.epochs = [layer.epoch for layer in self.layers]
            self._with_states(step.states, lambda: self._capture(step, key_len))
        for i, (layer, st) in enumerate(zip(self.layers, states, strict=True)):
            if step.epochs[i] != layer.epoch:  # type: ignore[index]
                copy_state(step.states[i], st)
                step.epochs[i] = layer.epoch  # type: ignore[index]
        step.graph.replay()
        return step.logits.clone()  # type: ignore[union-attr]

    def _with_states(self, states: list[list[tuple[Any, Any]]], run: Callable[[], Any]) -> Any:
        for layer, st in zip(self.layers, states, strict=True):
            layer.fixed = st
        try:
            return run()
        finally:
            for layer in self.layers:
                layer.fixed = None

    def _new_step(self, key: tuple) -> _Step:
        n, key_len, dev = key[0], key[1], self.device
        step = _Step(
            torch.zeros(n, dtype=torch.long, device=dev),
            torch.full((n,), -1, dtype=torch.long, device=dev),
            self.cache.decode_table(n, key_len).to(dev),
        )
        self.steps[key] = step
        self.new_steps += 1
        log.info("decode step for %d rows over %d keys: new (%s, %d kept)", n, key_len, self.mode, len(self.steps))
        while len(self.steps) > MAX_GRAPHS:
            self.steps.popitem(last=False)
        return step

    def _capture(self, step: _Step, key_len: int) -> None:
        """Capture ``step`` as a CUDA graph, after warm-up runs on a side stream (as PyTorch's docs prescribe)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(step.tokens, step.positions, step.table, key_len)
        torch.cuda.current_stream().wait_stream(stream)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self._pool):
            step.logits = self._step(step.tokens, step.positions, step.table, key_len)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, key_len: int) -> torch.Tensor:
        """The step itself: tensor ops over the buffers only (no host sync, no shape from data)."""
        pos = positions[:, None]
        batch = self.cache.bind_table(table, pos, key_len)
        return model_logits(self.model, self.embed(tokens[:, None]), pos, batch, keep=1)[:, 0]


def _clone(state: Any) -> Any:
    """A copy of ``state`` with its own tensors (same layout)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, tuple | list):
        return type(state)(_clone(s) for s in state)
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **{f.name: _clone(getattr(state, f.name)) for f in dataclasses.fields(state)})
    return state
