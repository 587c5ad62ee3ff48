"""The IA³ slot kind: per slot, ``l - 1`` on the layer's input (feed-forward layers) or output; applied as one
per-row elementwise scale (:mod:`hotswap.methods.ia3.ops`). It reads the base output, so it comes first."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, SlotKind, register_kind
from hotswap.methods.ia3.ops import gather_ia3


@dataclass(frozen=True)
class IA3Vector:
    """One adapter's IA³ vector at one linear: ``scale`` (in,) scaling the input if ``feedforward``, else (out,)."""

    scale: torch.Tensor
    feedforward: bool


@register_kind
class IA3Kind(SlotKind):
    name = "ia3"
    order = 5  # before the LoRA kind, which accumulates into the output in place

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.inp = self._empty(base.in_features)  # (slots+1, in): l - 1 of feed-forward adapters
        self.out = self._empty(base.out_features)  # (slots+1, out): l - 1 of the others
        self.side: list[str | None] = [None] * (num_slots + 1)

    def set(self, slot: int, payload: IA3Vector | None) -> None:
        self.inp[slot], self.out[slot], self.side[slot] = 0, 0, None
        if payload is not None:
            side = "inp" if payload.feedforward else "out"
            getattr(self, side)[slot] = payload.scale - 1
            self.side[slot] = side

    def holds(self, slot: int) -> bool:
        return self.side[slot] is not None

    def gather(self, plan: BatchPlan, used: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        assert plan.slots is not None and plan.weights is not None
        sides = {self.side[s] for s in used}
        s_in = gather_ia3(self.inp, plan.slots, plan.weights) if "inp" in sides else None  # (Bt, 1, in)
        s_out = gather_ia3(self.out, plan.slots, plan.weights) if "out" in sides else None  # (Bt, 1, out)
        return s_in, s_out

    def scale_input(self, x: torch.Tensor, state: tuple) -> torch.Tensor:
        return x if state[0] is None else x * state[0]

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: tuple) -> torch.Tensor:
        return y if state[1] is None else y + (state[1] - 1) * base_out  # base_out * s as a delta
