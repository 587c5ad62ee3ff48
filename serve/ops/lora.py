"""Batched LoRA-family math for a batch in which every row picks its own adapter slots.

Slot tables hold every resident adapter of one layer, padded to a common rank capacity ``R``;
slot 0 is all zeros ("no adapter"). Each row ``b`` names ``K`` slots ``slots[b]`` with weights
``weights[b]`` (a plain adapter is ``K = 1``, weight 1; rows without adapter use slot 0). The row's
delta is the weighted sum of its adapters' deltas:

    delta[b] = sum_k weights[b, k] * x[b] @ A[slots[b, k], :rank].T @ B[slots[b, k], :rank]

Composition is rank concatenation, so the whole batch is two ``bmm`` calls whatever the mix of
adapters: gather each row's factors (once per batch plan; the engine caches them while the batch
does not change), then ``x @ A_rows^T @ B_rows``. No Python loop over rows or adapters.
"""

from __future__ import annotations

import torch


def gather_rows(
    A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row stacked factors. A: [S, R, in], B: [S, R, out] (scaling folded in), slots/weights: [Bt, K].

    Returns A_rows [Bt, K*rank, in] and B_rows [Bt, K*rank, out] with each adapter's weight folded into B.
    """
    bt, k = slots.shape
    a = A[slots, :rank]  # (Bt, K, r, in)
    b = B[slots, :rank] * weights[:, :, None, None].to(B.dtype)  # (Bt, K, r, out)
    return a.reshape(bt, k * rank, A.shape[-1]), b.reshape(bt, k * rank, B.shape[-1])


def lora_apply(x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """x: [Bt, T, in] -> delta [Bt, T, out] = x @ a_rows^T @ b_rows."""
    h = torch.bmm(x, a_rows.transpose(1, 2))  # (Bt, T, K*r)
    return torch.bmm(h, b_rows)  # (Bt, T, out)


def lora_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """The module docstring's ``delta`` for x: [Bt, T, in] -> [Bt, T, out]."""
    return lora_apply(x, *gather_rows(A, B, slots, weights, rank))


def weighted_rows(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-row weighted sum of slot vectors. table: [S, out], slots/weights: [Bt, K] -> [Bt, out].

    Used for BitFit bias deltas and for DoRA's per-row scale ``sum_k w_k (m_k / ||W + s B A||_k - 1)``.
    """
    return torch.einsum("bk,bko->bo", weights.to(table.dtype), table[slots])
