"""Row-by-row reference of :mod:`.rows` (the test oracle)."""

from __future__ import annotations

import torch


def weighted_rows(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_k weights[b, k] * table[slots[b, k]]."""
    out = torch.zeros(slots.shape[0], table.shape[-1], dtype=torch.float32)
    for b in range(slots.shape[0]):
        for k in range(slots.shape[1]):
            out[b] += float(weights[b, k]) * table[int(slots[b, k])].float()
    return out
