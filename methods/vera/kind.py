"""VeRA's slot kind: per slot, the adapter's projections with its vectors folded in (a rank-r update), padded to a
common rank; applied per row by :mod:`hotswap.methods.vera.ops`. It reads only the layer's input, so it comes
after the kinds that read the base output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, SlotKind, register_kind
from hotswap.methods.vera.ops import gather_vera, vera_apply


@dataclass(frozen=True)
class VeraFactors:
    """One adapter's VeRA update at one linear: ``A`` = Λ_d A (r, in) and ``B`` = (Λ_b B)^T (r, out)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @classmethod
    def fold(
        cls,
        shared_a: torch.Tensor,
        shared_b: torch.Tensor,
        lambda_d: torch.Tensor,
        lambda_b: torch.Tensor,
        layer: nn.Linear,
        dtype: torch.dtype,
    ) -> VeraFactors:
        """PEFT's update of ``layer`` (shared A (r, >= in) and B (>= out, r) sliced to it), folded in fp32."""
        a = lambda_d.float()[:, None] * shared_a.float()[:, : layer.in_features]  # (r, in)
        b = lambda_b.float()[:, None] * shared_b.float()[: layer.out_features]  # (out, r)
        return cls(a.to(dtype).contiguous(), b.T.to(dtype).contiguous())


@register_kind
class VeraKind(SlotKind):
    name = "vera"
    order = 20  # after LoRA's in-place accumulation; VeRA reads only the input

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.A = self._empty(0, base.in_features)  # (slots+1, R, in)
        self.B = self._empty(0, base.out_features)  # (slots+1, R, out)
        self.slot_rank = [0] * (num_slots + 1)

    def set(self, slot: int, payload: VeraFactors | None) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.slot_rank[slot] = 0
        if payload is None:
            return
        r = payload.rank
        if r > self.A.shape[1]:
            pad = r - self.A.shape[1]
            self.A = nn.functional.pad(self.A, (0, 0, 0, pad))
            self.B = nn.functional.pad(self.B, (0, 0, 0, pad))
        self.A[slot, :r] = payload.A
        self.B[slot, :r] = payload.B
        self.slot_rank[slot] = r

    def holds(self, slot: int) -> bool:
        return self.slot_rank[slot] > 0

    def gather(self, plan: BatchPlan, used: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        assert plan.slots is not None and plan.weights is not None
        rank = max(self.slot_rank[s] for s in used)
        return gather_vera(self.A, self.B, plan.slots, plan.weights, rank)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: tuple) -> torch.Tensor:
        return vera_apply(x, *state, y)
