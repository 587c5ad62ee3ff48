"""The sparse slot kind: each slot's ΔW of one layer as (flat indices into (out, in), values), applied for the
batch's rows by one stacked sparse product (:mod:`hotswap.methods.sparse.ops`)."""

from __future__ import annotations

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, SlotKind, register_kind
from hotswap.methods.sparse.ops import SparsePlan, gather_sparse, sparse_apply


@register_kind
class SparseKind(SlotKind):
    name = "sparse"
    order = 20

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (indices, values)

    def set(self, slot: int, payload: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.entries.pop(slot, None)
        if payload is not None:
            idx, val = payload
            self.entries[slot] = (idx.to(self.device), val.to(device=self.device, dtype=self.dtype))

    def holds(self, slot: int) -> bool:
        return slot in self.entries

    def gather(self, plan: BatchPlan, used: list[int]) -> SparsePlan:
        assert plan.slots is not None and plan.weights is not None
        b = self.base
        return gather_sparse(self.entries, used, b.out_features, b.in_features, plan.slots, plan.weights)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: SparsePlan) -> torch.Tensor:
        return sparse_apply(x, state, out=y)
