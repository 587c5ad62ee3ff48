"""Batched per-row ops any kind may use (the pure-torch reference beside it: :mod:`.rows_ref`)."""

from __future__ import annotations

import torch


def weighted_rows(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-row weighted sum of slot vectors. table: [S, out], slots/weights: [Bt, K] -> [Bt, out].

    E.g. a per-row bias delta, or a per-row output scale, from per-slot vectors.
    """
    return torch.einsum("bk,bko->bo", weights.to(table.dtype), table[slots])
