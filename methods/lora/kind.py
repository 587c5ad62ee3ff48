"""LoRA's slot kind: per-slot factors padded to a common rank, DoRA's per-output scale, and per-row ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, SlotKind, register_kind, weighted_rows
from hotswap.methods.lora.ops import gather_rows, gather_unique, lora_apply, lora_apply_unique, rank_truncation


@dataclass(frozen=True)
class LoraFactors:
    """LoRA's payload: A (r, in), B (r, out) with the scaling (and DoRA's magnitude scale) folded in, and DoRA's
    per-output scale m / ||W + s B A|| - 1 (None for plain LoRA), which scales the base output."""

    A: torch.Tensor
    B: torch.Tensor
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@register_kind
class LoraKind(SlotKind):
    """LoRA-family deltas (LoRA, DoRA, AdaLoRA/PLoRA/DyLoRA exports): slot tables padded to a common rank."""

    name = "lora"
    order = 10

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.A = self._empty(0, base.in_features)  # (slots+1, R, in)
        self.B = self._empty(0, base.out_features)  # (slots+1, R, out)
        self.dora: torch.Tensor | None = None  # (slots+1, out), allocated on the first DoRA adapter
        self.slot_rank = [0] * (num_slots + 1)
        self.slot_dora = [False] * (num_slots + 1)

    def set(self, slot: int, payload: LoraFactors | None) -> None:
        r = 0 if payload is None else payload.rank
        if r > self.A.shape[1]:
            pad = r - self.A.shape[1]
            self.A = torch.nn.functional.pad(self.A, (0, 0, 0, pad))
            self.B = torch.nn.functional.pad(self.B, (0, 0, 0, pad))
        if payload is not None:
            self.A[slot, :r] = payload.A
            self.B[slot, :r] = payload.B
        if r < self.A.shape[1]:  # the rest of the slot's capacity reads as zero (one table write per part)
            self.A[slot, r:].zero_()
            self.B[slot, r:].zero_()
        dora = payload is not None and payload.dora_scale is not None
        if dora and self.dora is None:
            self.dora = self._empty(self.base.out_features)
        if self.dora is not None:
            self.dora[slot] = payload.dora_scale if dora else 0  # type: ignore[union-attr]
        self.slot_rank[slot], self.slot_dora[slot] = r, dora

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
            lora = ("unique", gather_unique(self.A, self.B, plan.slots, plan.weights, rank, used))
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
            return lora_apply_unique(x, lora[1], out=y)
        return lora_apply(x, *lora[1:], out=y)
