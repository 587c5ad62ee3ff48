"""The bottleneck slot kind: each slot's adapter module at one layer, the batch's adapters stacked along the
bottleneck like LoRA ranks (:mod:`hotswap.methods.bottleneck.ops`). Applied last: a serial bottleneck reads
the row's whole output."""

from __future__ import annotations

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, SlotKind, register_kind
from hotswap.methods.bottleneck.ops import Bottleneck, bottleneck_apply, gather_bottleneck


@register_kind
class BottleneckKind(SlotKind):
    name = "bottleneck"
    order = 100

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.entries: dict[int, Bottleneck] = {}

    def set(self, slot: int, payload: Bottleneck | None) -> None:
        self.entries.pop(slot, None)
        if payload is not None:
            parts = (payload.down, payload.down_bias, payload.up, payload.up_bias)
            moved = [t.to(device=self.device, dtype=self.dtype) for t in parts]
            self.entries[slot] = Bottleneck(*moved, activation=payload.activation, serial=payload.serial)

    def holds(self, slot: int) -> bool:
        return slot in self.entries

    def gather(self, plan: BatchPlan, used: list[int]) -> list:
        assert plan.slots is not None and plan.weights is not None
        return gather_bottleneck(self.entries, used, plan.slots, plan.weights)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: list) -> torch.Tensor:
        return bottleneck_apply(x, y, state)
