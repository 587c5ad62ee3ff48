"""Batched IA³ (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): a learned vector ``l`` scales a layer's output (keys, values) or, on feed-forward layers, its input.
Unmerged and per row, a row's scale is ``s[b] = 1 + sum_k weights[b, k] * (l[slots[b, k]] - 1)`` (a single
adapter at weight 1 gives exactly ``l``; slot 0 and other methods' slots hold 0), so

    output side: y[b] = base(x[b]) * s[b]        input side: y[b] = base(x[b] * s[b])

One gather per batch plan and one elementwise product per forward: no loop over rows or adapters.
"""

from __future__ import annotations

import torch


def gather_ia3(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """table: [S, d] holding ``l - 1`` per slot; slots/weights: [Bt, K] -> each row's scale ``s`` [Bt, 1, d]."""
    delta = torch.einsum("bk,bkd->bd", weights.to(table.dtype), table[slots])  # (Bt, d)
    return (1 + delta)[:, None, :]  # (Bt, 1, d)
