"""The batch plan, the multi-adapter linear layer that reads it, and the slot kinds it holds.

At start-up every linear layer of the base's decoder blocks is wrapped once by
:class:`MultiAdapterLinear`. It keeps the base layer untouched (weights never change) and, per
resident adapter slot, that adapter's delta for this layer, held by *slot kinds*: one
:class:`SlotKind` per kind of delta (LoRA factors with DoRA's scale, a bias, a sparse ΔW, a bottleneck
module, IA³ scales...). A method's loader returns, per module, a :class:`LinearDelta` whose parts are
keyed by kind name; the layer creates a kind the first time one of its parts is installed, so the
layer never names a method. Before each forward the engine sets the shared :class:`BatchPlan` (which
slots, with which weights, each row uses); each kind gathers its rows once per plan and adds its
delta with its batched op.

Kinds register once (:func:`register_kind`); the LoRA and bias kinds, shared by several methods, live
here, a method's own kind lives in its folder (``hotswap.methods.<method>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hotswap.serve.ops import (
    gather_rows,
    gather_unique,
    lora_apply,
    lora_apply_unique,
    rank_truncation,
    weighted_rows,
)


@dataclass
class BatchPlan:
    """Which adapter slots each row of the current forward uses. Set by the engine before each forward."""

    slots: torch.Tensor | None = None  # (Bt, K) long; slot 0 = no adapter
    weights: torch.Tensor | None = None  # (Bt, K) float
    ranks: torch.Tensor | None = None  # (Bt,) long: DyLoRA rank per row, 0 = full; None when no row asks
    used: frozenset[int] = frozenset()  # non-zero slots present in `slots`
    version: int = 0  # bumped whenever slots/weights change, so layers can reuse gathered factors
    _key: tuple = field(default=(), repr=False)

    def set(self, rows: list[list[tuple[int, float]]], device: torch.device, ranks: list[int] | None = None) -> None:
        """rows[b] = [(slot, weight), ...] (empty for the base model); ranks[b] = DyLoRA rank (0 = full)."""
        ranks = ranks if ranks is not None and any(ranks) else None
        key = (tuple(tuple(r) for r in rows), tuple(ranks or ()))
        if key == self._key:
            return
        self._key = key
        self.version += 1
        self.used = frozenset(s for r in rows for s, _ in r if s)
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


@dataclass(frozen=True)
class LinearDelta:
    """One adapter's delta for one linear layer, ready to install in a slot: payloads keyed by slot kind name
    (e.g. ``{"lora": LoraFactors(...)}``; a method may use several kinds on one layer)."""

    parts: dict[str, Any]

    @property
    def rank(self) -> int:
        lora = self.parts.get("lora")
        return 0 if lora is None else lora.A.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(p) for p in self.parts.values())


def _nbytes(payload: object) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, tuple | list):
        return sum(_nbytes(p) for p in payload)
    return sum(_nbytes(v) for v in vars(payload).values() if isinstance(v, torch.Tensor | tuple | list))


class SlotKind:
    """One kind of per-slot delta of one layer: its tables, its per-plan gather and its batched apply.

    ``order`` places it among the layer's kinds (applied in increasing order; a kind that reads the whole
    output, like a serial bottleneck, goes last). A kind may scale the base layer's input per row
    (:meth:`scale_input`) and add to the output (:meth:`apply`, given the base output and the running one).
    """

    name: ClassVar[str]
    order: ClassVar[int] = 50

    def __init__(self, base: nn.Linear, num_slots: int) -> None:
        self.base, self.num_slots = base, num_slots

    def set(self, slot: int, payload: Any | None) -> None:
        """Install ``payload`` in ``slot`` (or clear it with None). Never during a forward."""
        raise NotImplementedError

    def holds(self, slot: int) -> bool:
        raise NotImplementedError

    def gather(self, plan: BatchPlan, used: list[int]) -> Any:
        """Per-row state for the plan's rows, given the plan's slots this kind holds (non-empty)."""
        raise NotImplementedError

    def scale_input(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        return x

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: Any) -> torch.Tensor:
        return y

    def _empty(self, *shape: int) -> torch.Tensor:
        w = self.base.weight
        return torch.zeros(self.num_slots + 1, *shape, dtype=w.dtype, device=w.device)


_KINDS: dict[str, type[SlotKind]] = {}


def register_kind(cls: type[SlotKind]) -> type[SlotKind]:
    """Register a slot kind by its ``name``; a name registers once."""
    if cls.name in _KINDS:
        raise ValueError(f"slot kind {cls.name!r} is already registered")
    _KINDS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class LoraFactors:
    """LoRA's payload: A (r, in), B (r, out) with the scaling (and DoRA's magnitude scale) folded in, and DoRA's
    per-output scale m / ||W + s B A|| - 1 (None for plain LoRA), which scales the base output."""

    A: torch.Tensor
    B: torch.Tensor
    dora_scale: torch.Tensor | None = None


@register_kind
class LoraKind(SlotKind):
    """LoRA-family deltas (LoRA, DoRA, AdaLoRA/PLoRA/DyLoRA exports): slot tables padded to a common rank."""

    name = "lora"
    order = 10

    def __init__(self, base: nn.Linear, num_slots: int) -> None:
        super().__init__(base, num_slots)
        self.A = self._empty(0, base.in_features)  # (slots+1, R, in)
        self.B = self._empty(0, base.out_features)  # (slots+1, R, out)
        self.dora: torch.Tensor | None = None  # (slots+1, out), allocated on the first DoRA adapter
        self.slot_rank = [0] * (num_slots + 1)
        self.slot_dora = [False] * (num_slots + 1)

    def set(self, slot: int, payload: LoraFactors | None) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        if self.dora is not None:
            self.dora[slot].zero_()
        self.slot_rank[slot], self.slot_dora[slot] = 0, False
        if payload is None:
            return
        r = payload.A.shape[0]
        if r > self.A.shape[1]:
            pad = r - self.A.shape[1]
            self.A = torch.nn.functional.pad(self.A, (0, 0, 0, pad))
            self.B = torch.nn.functional.pad(self.B, (0, 0, 0, pad))
        self.A[slot, :r] = payload.A
        self.B[slot, :r] = payload.B
        self.slot_rank[slot] = r
        if payload.dora_scale is not None:
            if self.dora is None:
                self.dora = self._empty(self.base.out_features)
            self.dora[slot] = payload.dora_scale
            self.slot_dora[slot] = True

    def holds(self, slot: int) -> bool:
        return self.slot_rank[slot] > 0

    def gather(self, plan: BatchPlan, used: list[int]) -> tuple:
        assert plan.slots is not None and plan.weights is not None
        rank = max(self.slot_rank[s] for s in used)
        # Few distinct adapters for many rows: read each adapter once (dense path); else per row.
        if plan.ranks is not None:  # DyLoRA rows at a chosen rank: the per-row path truncates
            slot_ranks = torch.tensor(self.slot_rank, device=plan.slots.device)
            trunc = rank_truncation(slot_ranks, plan.slots, plan.ranks, rank)
            lora = ("rows", *gather_rows(self.A, self.B, plan.slots, plan.weights, rank, trunc))
        elif 2 * len(used) <= plan.slots.shape[0]:
            lora = ("unique", *gather_unique(self.A, self.B, plan.slots, plan.weights, rank, used))
        else:
            lora = ("rows", *gather_rows(self.A, self.B, plan.slots, plan.weights, rank))
        dora = None
        if self.dora is not None and any(self.slot_dora[s] for s in used):
            dora = weighted_rows(self.dora, plan.slots, plan.weights)[:, None, :]  # (Bt, 1, out)
        return lora, dora

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: tuple) -> torch.Tensor:
        lora, dora = state
        if dora is not None:  # DoRA: (m/||W+sBA|| - 1) * (W x), the bias excluded
            base_no_bias = base_out if self.base.bias is None else base_out - self.base.bias
            y = y + dora * base_no_bias
        if lora[0] == "unique":  # accumulate in place: y is a fresh tensor owned by this forward
            return lora_apply_unique(x, *lora[1:], out=y)
        return lora_apply(x, *lora[1:], out=y)


@register_kind
class BiasKind(SlotKind):
    """Per-row bias deltas (BitFit): a layer without a bias gets one only in the adapter's rows."""

    name = "bias"
    order = 30

    def __init__(self, base: nn.Linear, num_slots: int) -> None:
        super().__init__(base, num_slots)
        self.table = self._empty(base.out_features)  # (slots+1, out)
        self.slot_set = [False] * (num_slots + 1)

    def set(self, slot: int, payload: torch.Tensor | None) -> None:
        self.table[slot] = 0 if payload is None else payload
        self.slot_set[slot] = payload is not None

    def holds(self, slot: int) -> bool:
        return self.slot_set[slot]

    def gather(self, plan: BatchPlan, used: list[int]) -> torch.Tensor:
        assert plan.slots is not None and plan.weights is not None
        return weighted_rows(self.table, plan.slots, plan.weights)[:, None, :]  # (Bt, 1, out)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return y + state


class MultiAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-slot adapter deltas applied row by row, never merged into W."""

    def __init__(self, base: nn.Linear, plan: BatchPlan, num_slots: int) -> None:
        super().__init__()
        self.base = base
        self.plan = plan
        self.num_slots = num_slots  # resident slots; tables have num_slots + 1 rows (slot 0 = zero)
        self.kinds: dict[str, SlotKind] = {}  # created on first install, kept in application order
        self._cached_version = -1
        self._states: list[tuple[SlotKind, Any]] = []

    # Slot tables are ordinary tensors even when written from the engine's inference-mode loop, so
    # any later write (forward_logits, unload) can update them in place.
    @torch.inference_mode(False)
    @torch.no_grad()
    def set_slot(self, slot: int, delta: LinearDelta | None) -> None:
        """Install (or with ``None`` clear) one adapter's delta in ``slot``. Never during a forward."""
        assert 1 <= slot <= self.num_slots
        parts = delta.parts if delta is not None else {}
        for name in parts:
            if name not in self.kinds:
                if name not in _KINDS:
                    raise ValueError(f"unknown slot kind {name!r} (registered: {', '.join(sorted(_KINDS))})")
                self.kinds[name] = _KINDS[name](self.base, self.num_slots)
                self.kinds = dict(sorted(self.kinds.items(), key=lambda kv: kv[1].order))
        for name, kind in self.kinds.items():
            kind.set(slot, parts.get(name))
        self._cached_version = -1

    def _batch_states(self) -> list[tuple[SlotKind, Any]]:
        """Each kind's gathered rows for the current plan, computed once per plan version."""
        plan = self.plan
        if self._cached_version != plan.version:
            self._states = []
            for kind in self.kinds.values():
                used = sorted(s for s in plan.used if kind.holds(s))
                if used:
                    self._states.append((kind, kind.gather(plan, used)))
            self._cached_version = plan.version
        return self._states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plan.used:
            return self.base(x)
        states = self._batch_states()
        x_base = x
        for kind, state in states:
            x_base = kind.scale_input(x_base, state)
        base_out = self.base(x_base)  # (Bt, T, out)
        y = base_out
        for kind, state in states:
            y = kind.apply(x, base_out, y, state)
        return y
