"""Batched VeRA (Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation"): one pair of frozen random
projections ``A`` (r, in) and ``B`` (out, r) shared by every layer (sliced to its size), and two learned vectors per
layer, so ``delta = Λ_b B Λ_d A x``. The loader folds the vectors into the projections, per slot
``A' = Λ_d A`` (r, in) and ``B' = (Λ_b B)^T`` (r, out), padded to a common rank ``R``; slot 0 and other methods'
slots hold zeros. A row's delta is the weighted sum of its adapters' deltas:

    delta[b] = sum_k weights[b, k] * x[b] @ A'[slots[b, k]].T @ B'[slots[b, k]]

Each row's factors are gathered once per batch plan (the adapter's weight folded into B') and applied with two
``bmm``: no loop over rows or adapters.
"""

from __future__ import annotations

import torch


def gather_vera(
    A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A: [S, R, in], B: [S, R, out], slots/weights: [Bt, K] -> per-row A_rows [Bt, K*rank, in] and
    B_rows [Bt, K*rank, out], each adapter's weight folded into B_rows."""
    bt, k = slots.shape
    a = A[slots, :rank]  # (Bt, K, r, in)
    b = B[slots, :rank] * weights.to(B.dtype)[:, :, None, None]  # (Bt, K, r, out)
    return a.reshape(bt, k * rank, A.shape[-1]), b.reshape(bt, k * rank, B.shape[-1])


def vera_apply(x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x: [Bt, T, in], y: [Bt, T, out] -> y + x @ a_rows^T @ b_rows (a new tensor)."""
    return torch.baddbmm(y, torch.bmm(x, a_rows.transpose(1, 2)), b_rows)
