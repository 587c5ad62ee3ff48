"""BitFit's slot kind: a per-row bias delta (a layer without a bias gets one only in the adapter's rows)."""

from __future__ import annotations

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, SlotKind, register_kind, weighted_rows


@register_kind
class BiasKind(SlotKind):
    """Per-row bias deltas (BitFit): a layer without a bias gets one only in the adapter's rows."""

    name = "bias"
    order = 30

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.table = self._empty(base.out_features)  # (slots+1, out)
        self.slot_set = [False] * (num_slots + 1)

    def set(self, slot: int, payload: torch.Tensor | None) -> None:
        self.table[slot] = 0 if payload is None else payload
        self.slot_set[slot] = payload is not None

    def holds(self, slot: int) -> bool:
        return self.slot_set[slot]

    def gather(self, plan: BatchPlan, used: list[int]) -> torch.Tensor:
        assert plan.slots is not None and plan.weights is not None
        return weighted_rows(self.table, plan.slots, plan.nonunit_weights)[:, None, :]  # (Bt, 1, out)

    def additive(self, x: torch.Tensor, state: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        # alone, the rows' biases are where the base product accumulates (as into a base bias): no pass of its own
        return state.expand(*x.shape[:-1], state.shape[-1]).clone() if into is None else into.add_(state)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return y + state
