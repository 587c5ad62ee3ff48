"""The batch plan, and the multi-adapter linear layer that reads it.

At start-up every linear layer of the base's decoder blocks is wrapped once by
:class:`MultiAdapterLinear`. It keeps the base layer untouched (weights never change) and, per
resident adapter slot, that adapter's delta for this layer: LoRA factors (scaling folded in),
DoRA's per-output scale, a BitFit bias. Before each forward the engine sets the shared
:class:`BatchPlan` (which slots, with which weights, each row uses); every wrapped layer then adds
its batch's deltas with the batched ops of :mod:`hotswap.serve.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hotswap.serve.ops import (
    Bottleneck,
    bottleneck_apply,
    gather_bottleneck,
    gather_rows,
    gather_sparse,
    gather_unique,
    lora_apply,
    lora_apply_unique,
    rank_truncation,
    sparse_apply,
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
    """One adapter's delta for one linear layer, ready to install in a slot."""

    A: torch.Tensor | None = None  # (r, in)
    B: torch.Tensor | None = None  # (r, out): scaling (and DoRA's magnitude scale) folded in
    dora_scale: torch.Tensor | None = None  # (out,) m / ||W + s B A|| - 1: scales the base output
    bias: torch.Tensor | None = None  # (out,) added to the output (BitFit)
    sparse: tuple[torch.Tensor, torch.Tensor] | None = None  # (flat indices into (out, in), values): ΔW
    bottleneck: Bottleneck | None = None  # an adapter module after (serial) or beside (parallel) the layer

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    @property
    def nbytes(self) -> int:
        parts = (self.A, self.B, self.dora_scale, self.bias, *(self.sparse or ()))
        extra = self.bottleneck.nbytes if self.bottleneck is not None else 0
        return extra + sum(t.numel() * t.element_size() for t in parts if t is not None)


class MultiAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-slot adapter deltas applied row by row, never merged into W."""

    def __init__(self, base: nn.Linear, plan: BatchPlan, num_slots: int) -> None:
        super().__init__()
        self.base = base
        self.plan = plan
        self.num_slots = num_slots  # resident slots; tables have num_slots + 1 rows (slot 0 = zero)
        w = base.weight
        self.A = torch.zeros(num_slots + 1, 0, base.in_features, dtype=w.dtype, device=w.device)
        self.B = torch.zeros(num_slots + 1, 0, base.out_features, dtype=w.dtype, device=w.device)
        self.dora: torch.Tensor | None = None  # (slots+1, out), allocated on first DoRA adapter
        self.bias: torch.Tensor | None = None  # (slots+1, out), allocated on first BitFit adapter
        self.slot_rank = [0] * (num_slots + 1)
        self.slot_dora = [False] * (num_slots + 1)
        self.slot_bias = [False] * (num_slots + 1)
        self.sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> sparse ΔW (Child-tuning, FishMask)
        self.bottlenecks: dict[int, Bottleneck] = {}  # slot -> bottleneck adapter module
        self._cached_version = -1
        self._rows: tuple = (None,) * 5  # (lora path + factors, dora rows, bias rows, sparse, bottleneck groups)

    # -- slot management (engine thread, between steps) ------------------------------------------
    def _grow_rank(self, rank: int) -> None:
        pad = rank - self.A.shape[1]
        self.A = torch.nn.functional.pad(self.A, (0, 0, 0, pad))
        self.B = torch.nn.functional.pad(self.B, (0, 0, 0, pad))

    def _table(self, attr: str) -> torch.Tensor:
        if getattr(self, attr) is None:
            w = self.base.weight
            setattr(self, attr, torch.zeros(self.num_slots + 1, self.base.out_features, dtype=w.dtype, device=w.device))
        return getattr(self, attr)

    # Slot tables are ordinary tensors even when written from the engine's inference-mode loop, so
    # any later write (forward_logits, unload) can update them in place.
    @torch.inference_mode(False)
    @torch.no_grad()
    def set_slot(self, slot: int, delta: LinearDelta | None) -> None:
        """Install (or with ``None`` clear) one adapter's delta in ``slot``. Never during a forward."""
        assert 1 <= slot <= self.num_slots
        self.A[slot].zero_()
        self.B[slot].zero_()
        for attr in ("dora", "bias"):
            if getattr(self, attr) is not None:
                getattr(self, attr)[slot].zero_()
        self.slot_rank[slot], self.slot_dora[slot], self.slot_bias[slot] = 0, False, False
        self.sparse.pop(slot, None)
        self.bottlenecks.pop(slot, None)
        if delta is not None:
            if delta.bottleneck is not None:
                w, bn = self.base.weight, delta.bottleneck
                moved = [t.to(device=w.device, dtype=w.dtype) for t in (bn.down, bn.down_bias, bn.up, bn.up_bias)]
                self.bottlenecks[slot] = Bottleneck(*moved, activation=bn.activation, serial=bn.serial)
            if delta.sparse is not None:
                idx, val = delta.sparse
                w = self.base.weight
                self.sparse[slot] = (idx.to(w.device), val.to(device=w.device, dtype=w.dtype))
            if delta.A is not None:
                r = delta.rank
                if r > self.A.shape[1]:
                    self._grow_rank(r)
                self.A[slot, :r] = delta.A
                self.B[slot, :r] = delta.B
                self.slot_rank[slot] = r
            if delta.dora_scale is not None:
                self._table("dora")[slot] = delta.dora_scale
                self.slot_dora[slot] = True
            if delta.bias is not None:
                self._table("bias")[slot] = delta.bias
                self.slot_bias[slot] = True
        self._cached_version = -1

    # -- forward ---------------------------------------------------------------------------------
    def _batch_rows(self) -> tuple:
        """Gathered per-row factors for the current plan, computed once per plan version."""
        plan = self.plan
        if self._cached_version != plan.version:
            lora = dora_rows = bias_rows = None
            with_lora = sorted(s for s in plan.used if self.slot_rank[s])
            if with_lora:
                rank = max(self.slot_rank[s] for s in with_lora)
                # Few distinct adapters for many rows: read each adapter once (dense path); else per row.
                if plan.ranks is not None:  # DyLoRA rows at a chosen rank: the per-row path truncates
                    slot_ranks = torch.tensor(self.slot_rank, device=plan.slots.device)
                    trunc = rank_truncation(slot_ranks, plan.slots, plan.ranks, rank)
                    lora = ("rows", *gather_rows(self.A, self.B, plan.slots, plan.weights, rank, trunc))
                elif 2 * len(with_lora) <= plan.slots.shape[0]:
                    lora = ("unique", *gather_unique(self.A, self.B, plan.slots, plan.weights, rank, with_lora))
                else:
                    lora = ("rows", *gather_rows(self.A, self.B, plan.slots, plan.weights, rank))
            if any(self.slot_dora[s] for s in plan.used):
                dora_rows = weighted_rows(self.dora, plan.slots, plan.weights)[:, None, :]  # (Bt, 1, out)
            if any(self.slot_bias[s] for s in plan.used):
                bias_rows = weighted_rows(self.bias, plan.slots, plan.weights)[:, None, :]  # (Bt, 1, out)
            with_sparse = sorted(s for s in plan.used if s in self.sparse)
            sparse = None
            if with_sparse:
                b = self.base
                sparse = gather_sparse(
                    self.sparse, with_sparse, b.out_features, b.in_features, plan.slots, plan.weights
                )
            with_bottleneck = sorted(s for s in plan.used if s in self.bottlenecks)
            groups = gather_bottleneck(self.bottlenecks, with_bottleneck, plan.slots, plan.weights) or None
            self._rows = (lora, dora_rows, bias_rows, sparse, groups)
            self._cached_version = plan.version
        return self._rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (Bt, T, out)
        if not self.plan.used:
            return y
        lora, dora_rows, bias_rows, sparse, groups = self._batch_rows()
        if dora_rows is not None:  # DoRA: (m/||W+sBA|| - 1) * (W x), the bias excluded
            base_no_bias = y if self.base.bias is None else y - self.base.bias
            y = y + dora_rows * base_no_bias
        if lora is not None:  # accumulate in place into y, a fresh tensor owned by this call
            if lora[0] == "unique":
                lora_apply_unique(x, *lora[1:], out=y)
            else:
                lora_apply(x, *lora[1:], out=y)
        if sparse is not None:
            sparse_apply(x, sparse, out=y)
        if bias_rows is not None:
            y = y + bias_rows
        if groups is not None:  # last: a serial bottleneck reads the row's whole output
            bottleneck_apply(x, y, groups)
        return y
