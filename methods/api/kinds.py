"""Kinds: how a method's loaded weights act on a batch in which every row picks its own adapters.

A method's loader returns payloads keyed by kind name; the engine installs each payload in the resident
slot of its adapter and never looks inside. Three families of kinds, each registered once by its method
folder (:func:`register_kind`), so the engine names no method:

- :class:`SlotKind` — one linear layer's per-slot delta (LoRA factors, a bias, a sparse ΔW, a bottleneck, IA³
  scales...). Every linear of the base's decoder blocks is wrapped once; the wrapper creates a layer's kind the
  first time one of its payloads is installed. Before each forward the engine sets the shared
  :class:`BatchPlan`; each kind gathers its rows once per plan and adds its delta with its batched op.
- :class:`ExpertKind` — the same for one mixture-of-experts layer's stacked expert weights (e.g. LoRA per
  expert): a delta on each expert's projections, for the tokens routed to that expert only.
- :class:`EmbeddingKind` — the same for the input embedding: a delta on the embeddings of a row's tokens.
- :class:`ContextKind` — what comes before a row's text: positions written straight into the row's KV cache
  (learned keys/values) and/or virtual embeddings computed before the text.
- :class:`LogitKind` — an offset added to a row's next-token logits, computed beside the base (e.g. by other
  models over the row's text).

Context and logit kinds are engine-wide (one instance per engine, created on first use with the engine's
:class:`EngineRows`); slot, expert and embedding kinds are per wrapped module (each a :class:`SlotTable`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass
class BatchPlan:
    """Which adapter slots each row of the current forward uses. Set by the engine before each forward."""

    slots: torch.Tensor | None = None  # (Bt, K) long; slot 0 = no adapter
    weights: torch.Tensor | None = None  # (Bt, K) float
    ranks: torch.Tensor | None = None  # (Bt,) long: the rank a row asks for, 0 = full; None when no row asks
    used: frozenset[int] = frozenset()  # non-zero slots present in `slots`
    unit_weights: bool = True  # every weight in `weights` is 1 (plain adapters, no weighted composition)
    version: int = 0  # bumped whenever slots/weights change, so layers can reuse gathered factors
    _key: tuple = field(default=(), repr=False)
    _shared: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> tuple[tuple[tuple[int, float], ...], ...]:
        """Each row's (slot, weight) pairs, as set: rows with equal pairs have equal ``slots`` and ``weights`` rows."""
        return self._key[0] if self._key else ()

    @property
    def nonunit_weights(self) -> torch.Tensor | None:
        """``weights``, or None where every weight is 1 (plain adapters): nothing for a kind to multiply by."""
        return None if self.unit_weights else self.weights

    def shared(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, computed once per plan version and shared by every layer that asks with ``key``: what depends
        on the batch's rows alone (e.g. each row's coefficients on the batch's adapters), not on a layer's tables."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def set(self, rows: list[list[tuple[int, float]]], device: torch.device, ranks: list[int] | None = None) -> None:
        """rows[b] = [(slot, weight), ...] (empty for the base model); ranks[b] = the row's rank (0 = full)."""
        ranks = ranks if ranks is not None and any(ranks) else None
        key = (tuple(tuple(r) for r in rows), tuple(ranks or ()))
        if key == self._key:
            return
        self._key = key
        self.version += 1
        self._shared = {}
        self.used = frozenset(s for r in rows for s, _ in r if s)
        self.unit_weights = all(w == 1 for r in rows for _, w in r)
        if not self.used:
            self.slots = self.weights = self.ranks = None
            return
        self.ranks = None if ranks is None else torch.tensor(ranks, dtype=torch.long, device=device)
        k = max(len(r) for r in rows)
        slots = torch.zeros(len(rows), k, dtype=torch.long)
        weights = torch.zeros(len(rows), k, dtype=torch.float32)
        for b, r in enumerate(rows):
            for j, (s, w) in enumerate(r):
                slots[b, j], weights[b, j] = s, w
        self.slots, self.weights = slots.to(device), weights.to(device)


def nbytes(payload: object) -> int:
    """Bytes of the tensors a payload holds (tensors, sequences, mappings, modules, objects with tensor fields)."""
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, nn.Module):
        return sum(nbytes(p) for p in payload.parameters()) + sum(nbytes(b) for b in payload.buffers())
    if isinstance(payload, tuple | list):
        return sum(nbytes(p) for p in payload)
    if isinstance(payload, dict):
        return sum(nbytes(p) for p in payload.values())
    if hasattr(payload, "__dict__"):
        fields = vars(payload).values()
        return sum(nbytes(v) for v in fields if isinstance(v, torch.Tensor | tuple | list | dict | nn.Module))
    return 0


@dataclass(frozen=True)
class LinearDelta:
    """One adapter's delta for one wrapped module (a linear layer or an MoE layer's experts), ready to install in a
    slot: payloads keyed by kind name (e.g. ``{"lora": LoraFactors(...)}``; a method may use several kinds on one
    module)."""

    parts: dict[str, Any]

    @property
    def rank(self) -> int:
        """The largest ``rank`` of its payloads (the engine caps ranks it holds in slot tables); 0 without one."""
        return max((getattr(p, "rank", 0) for p in self.parts.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(nbytes(p) for p in self.parts.values())


class SlotTable:
    """One kind of per-slot delta of one wrapped module (a linear layer, or an MoE layer's experts): its tables, filled
    per resident slot, and its per-plan gather. ``order`` places it among the module's kinds (applied in increasing
    order)."""

    name: ClassVar[str]
    order: ClassVar[int] = 50

    def __init__(self, base: nn.Module, num_slots: int, dtype: torch.dtype) -> None:
        """``dtype``: the module's compute dtype, the deltas' (a quantized base's weight holds packed integers)."""
        self.base, self.num_slots = base, num_slots
        self.dtype, self.device = dtype, next(base.parameters()).device

    def set(self, slot: int, payload: Any | None) -> None:
        """Install ``payload`` in ``slot`` (or clear it with None). Never during a forward."""
        raise NotImplementedError

    def holds(self, slot: int) -> bool:
        raise NotImplementedError

    def gather(self, plan: BatchPlan, used: list[int]) -> Any:
        """Per-row state for the plan's rows, given the plan's slots this kind holds (non-empty)."""
        raise NotImplementedError

    def _empty(self, *shape: int) -> torch.Tensor:
        return torch.zeros(self.num_slots + 1, *shape, dtype=self.dtype, device=self.device)


class SlotKind(SlotTable):
    """A linear layer's kind. It may scale the base layer's input per row (:meth:`scale_input`) and add to the output
    (:meth:`apply`, given the base output and the running one; a kind that reads the whole output, like a serial
    bottleneck, goes last). A kind whose delta is a function of the input alone also says so with :meth:`additive`,
    which lets the layer compute it first and accumulate the base product into it."""

    base: nn.Linear

    def scale_input(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        return x

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: Any) -> torch.Tensor:
        return y

    def additive(self, x: torch.Tensor, state: Any, into: torch.Tensor | None) -> torch.Tensor | None:
        """When the state's delta reads neither the base output nor the running one (then ``apply`` returns ``y``
        plus it): this kind's delta (Bt, T, out) for ``x`` (Bt, T, in) added in place to ``into`` and returned, or
        without ``into`` as a new contiguous tensor the caller may write. None otherwise (``into`` untouched), and
        ``apply`` runs."""
        return None


class ExpertKind(SlotTable):
    """An MoE layer's kind (``base``: the layer's experts, transformers' stacked expert weights). The layer runs each
    expert on the tokens routed to it; the kind adds its delta to the experts' projections there, before their
    activation."""

    def delta(
        self, proj: str, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, counts: list[int], state: Any
    ) -> torch.Tensor | None:
        """The delta (n, out) of projection ``proj`` (the experts' parameter name, e.g. ``gate_up_proj``) on the
        routed (token, expert) pairs' inputs ``x`` (n, in), sorted by expert: pair i comes from batch row ``rows[i]``
        and goes to expert ``experts[i]``, and ``counts[e]`` pairs go to expert e. None where the kind adapts no such
        projection."""
        raise NotImplementedError


class EmbeddingKind(SlotTable):
    """The input embedding's kind (``base``: the model's input embedding module)."""

    def apply(self, ids: torch.Tensor, y: torch.Tensor, state: Any) -> torch.Tensor:
        """``y`` (Bt, T, hidden), the embeddings of ``ids`` (Bt, T) so far, plus this kind's delta for each row."""
        raise NotImplementedError


class RowRunner(Protocol):
    """Another causal LM run over the engine's rows, with its own KV cache indexed by the same rows."""

    def prefill(
        self, rows: list[int], embeds: list[torch.Tensor], starts: list[int], all_positions: bool = False
    ) -> list[torch.Tensor]:
        """Logits per row of ``embeds[i]`` (L_i, hidden) at positions ``starts[i]`` on: (V,) at the last, or
        (L_i, V) with ``all_positions``."""
        ...

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """The model's input embeddings of ``ids`` (L, hidden)."""
        ...

    def release(self, row: int, end: int) -> None:
        """Zero cache row ``row`` up to position ``end``."""
        ...


class KVWriter(Protocol):
    """The part of the engine's KV cache a context kind may write."""

    def write_kv(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put per-layer keys/values, each (kv_heads, P, head_dim), at positions [0, P) of ``row``."""
        ...


@dataclass(frozen=True)
class EngineRows:
    """What an engine-wide kind knows of the engine it serves in."""

    max_batch: int
    max_seq_len: int
    device: torch.device
    dtype: torch.dtype
    runner: Callable[[nn.Module], RowRunner]  # a model run beside the base over the engine's rows


class AdapterKind:
    """An engine-wide kind: one payload per resident slot (moved to the engine's device on install)."""

    name: ClassVar[str]

    def __init__(self, rows: EngineRows) -> None:
        self.rows = rows
        self.payloads: dict[int, Any] = {}

    def set(self, slot: int, payload: Any | None) -> None:
        """Install ``payload`` in ``slot`` (or clear it with None). Never during a forward."""
        if payload is None:
            self.payloads.pop(slot, None)
        else:
            self.payloads[slot] = payload

    def holds(self, slot: int) -> bool:
        return slot in self.payloads

    def clear_row(self, row: int, end: int) -> None:
        """A row is freed after writing positions [0, end): zero whatever the kind keeps per row."""


class ContextKind(AdapterKind):
    """What comes before a row's text. Cache positions [0, written) are written directly (:meth:`write`, on the
    row's first prefill chunk); then ``computed`` virtual positions come before the text's embeddings
    (:meth:`extend`). At most one context adapter applies to a request."""

    def written(self, slot: int) -> int:
        return 0

    def computed(self, slot: int) -> int:
        return 0

    def write(self, slot: int, cache: KVWriter, row: int) -> None:
        """Write the slot's positions [0, written) of ``row``."""

    def extend(self, slot: int, emb: torch.Tensor) -> torch.Tensor:
        """The embeddings to compute, (computed + L, hidden), from the text's (L, hidden)."""
        return emb


@dataclass(frozen=True)
class LogitRow:
    """One row's part in a logit kind's step: its cache row, its adapter slots with weights, the text tokens fed
    this step, and the index in the row's text (prompt + generated) of the first of them."""

    row: int
    slots: list[tuple[int, float]]
    ids: list[int]
    start: int


class LogitKind(AdapterKind):
    """An offset added to a row's next-token logits. It sees the row's text only (context positions are the
    base's), fed in order as prefill chunks and decoded tokens. Rows using one share no cached prompt blocks:
    the kind must see their whole text."""

    def offsets(self, rows: list[LogitRow], last_only: bool) -> list[torch.Tensor | None]:
        """Per row, its offset over its fed tokens (len(ids), V), or (V,) at the last with ``last_only``; None for a
        row none of whose slots this kind holds."""
        raise NotImplementedError


_SLOT_KINDS: dict[str, type[SlotTable]] = {}
_ADAPTER_KINDS: dict[str, type[AdapterKind]] = {}


K = TypeVar("K", bound=type)


def register_kind(cls: K) -> K:
    """Register a slot, expert, context or logit kind by its ``name``; a name registers once."""
    table: dict[str, Any] = _SLOT_KINDS if issubclass(cls, SlotTable) else _ADAPTER_KINDS
    if not issubclass(cls, SlotKind | ExpertKind | EmbeddingKind | ContextKind | LogitKind):
        raise TypeError(f"{cls.__name__} is not a SlotKind, ExpertKind, EmbeddingKind, ContextKind or LogitKind")
    if cls.name in _SLOT_KINDS or cls.name in _ADAPTER_KINDS:
        raise ValueError(f"kind {cls.name!r} is already registered")
    table[cls.name] = cls
    return cls


def slot_kind(name: str) -> type[SlotTable]:
    if name not in _SLOT_KINDS:
        raise ValueError(f"unknown slot kind {name!r} (registered: {', '.join(sorted(_SLOT_KINDS))})")
    return _SLOT_KINDS[name]


def adapter_kind(name: str) -> type[AdapterKind]:
    if name not in _ADAPTER_KINDS:
        raise ValueError(f"unknown context or logit kind {name!r} (registered: {', '.join(sorted(_ADAPTER_KINDS))})")
    return _ADAPTER_KINDS[name]
