"""Batched LoRA-family math for a batch in which every row picks its own adapter slots.

Slot tables hold every resident adapter of one layer, padded to a common rank capacity ``R``;
slot 0 is all zeros ("no adapter"). Each row ``b`` names ``K`` slots ``slots[b]`` with weights
``weights[b]`` (a plain adapter is ``K = 1``, weight 1; rows without adapter use slot 0). The row's
delta is the weighted sum of its adapters' deltas:

    delta[b] = sum_k weights[b, k] * x[b] @ A[slots[b, k], :rank].T @ B[slots[b, k], :rank]

Composition is rank concatenation. Two fast paths compute it, both without a Python loop over
rows or adapters, and both prepared once per batch plan (the layers cache them while the batch does
not change):

- per row (``gather_rows`` + ``lora_apply``): each row's own factors, two ``bmm``; reads one copy of
  the factors per row, so it suits batches where most rows have distinct adapters;
- per unique adapter (``gather_unique`` + ``lora_apply_unique``): the batch's U distinct adapters
  concatenated, two dense GEMMs for the whole batch and a per-row coefficient mask; reads each
  adapter once, so it wins when U is well below the batch size (popular adapters).
"""

from __future__ import annotations

import torch


def gather_rows(
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    rank: int,
    truncation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row stacked factors. A: [S, R, in], B: [S, R, out] (scaling folded in), slots/weights: [Bt, K];
    ``truncation`` [Bt, K, rank] (from :func:`rank_truncation`) scales each rank component per row.

    Returns A_rows [Bt, K*rank, in] and B_rows [Bt, K*rank, out] with each adapter's weight folded into B.
    """
    bt, k = slots.shape
    a = A[slots, :rank]  # (Bt, K, r, in)
    coef = weights[:, :, None].to(B.dtype).expand(bt, k, rank)
    if truncation is not None:
        coef = coef * truncation.to(B.dtype)
    b = B[slots, :rank] * coef[..., None]  # (Bt, K, r, out)
    return a.reshape(bt, k * rank, A.shape[-1]), b.reshape(bt, k * rank, B.shape[-1])


def rank_truncation(slot_ranks: torch.Tensor, slots: torch.Tensor, row_ranks: torch.Tensor, rank: int) -> torch.Tensor:
    """DyLoRA serving: row b uses only the first ``row_ranks[b]`` rank components of each adapter (0 = all),
    rescaled from the stored alpha/r to alpha/b. slot_ranks: [S]; returns [Bt, K, rank] coefficients
    ``(j < c) * r / c`` with r the slot's rank and c = min(row rank, r)."""
    r = slot_ranks[slots].to(torch.float32)  # (Bt, K)
    want = row_ranks[:, None].to(torch.float32).expand_as(r)
    cap = torch.where((want > 0) & (want < r), want, r).clamp(min=1)
    j = torch.arange(rank, device=slots.device, dtype=torch.float32)
    return (j[None, None, :] < cap[..., None]).to(torch.float32) * (r / cap)[..., None]


def lora_apply(
    x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [Bt, T, in] -> delta [Bt, T, out] = x @ a_rows^T @ b_rows, added in place to ``out`` if given."""
    h = torch.bmm(x, a_rows.transpose(1, 2))  # (Bt, T, K*r)
    return torch.bmm(h, b_rows) if out is None else out.baddbmm_(h, b_rows)  # (Bt, T, out)


def lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    rank: int,
    truncation: torch.Tensor | None = None,
) -> torch.Tensor:
    """The module docstring's ``delta`` for x: [Bt, T, in] -> [Bt, T, out]."""
    return lora_apply(x, *gather_rows(A, B, slots, weights, rank, truncation))


def gather_unique(
    A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int, used: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of the batch's distinct slots ``used`` (U of them) and each row's coefficient on them.

    Returns a_cat [U*rank, in], b_cat [U*rank, out] and coef [Bt, 1, U*rank], where
    coef[b, 0, u*rank:(u+1)*rank] = sum_k weights[b, k] * (slots[b, k] == used[u]).
    """
    idx = torch.tensor(used, device=slots.device)
    a_cat = A[idx, :rank].reshape(len(used) * rank, A.shape[-1])  # (U*r, in)
    b_cat = B[idx, :rank].reshape(len(used) * rank, B.shape[-1])  # (U*r, out)
    onehot = (slots[:, :, None] == idx[None, None, :]).to(weights.dtype)  # (Bt, K, U)
    coef = torch.einsum("bk,bku->bu", weights, onehot)  # (Bt, U)
    coef = coef.repeat_interleave(rank, dim=1)[:, None, :].to(A.dtype)  # (Bt, 1, U*r)
    return a_cat, b_cat, coef


def lora_apply_unique(
    x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, coef: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [Bt, T, in] -> delta [Bt, T, out] = ((x @ a_cat^T) * coef) @ b_cat, added in place to ``out`` if given.

    A row's coefficient on an adapter it does not use is an exact zero, even where ``x @ a_cat^T``
    overflowed for that adapter (0 * inf would be NaN): one adapter can never reach another row."""
    h = x @ a_cat.T  # (Bt, T, U*r)
    h = torch.where(coef != 0, h * coef, 0.0)  # (Bt, T, U*r)
    if out is None:
        return h @ b_cat  # (Bt, T, out)
    out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_cat)
    return out


def lora_delta_unique(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """The module docstring's ``delta`` through the per-unique-adapter path (same result as ``lora_delta``)."""
    used = sorted(set(slots.flatten().tolist()) - {0})
    if not used:
        return torch.zeros(*x.shape[:2], B.shape[-1], dtype=x.dtype, device=x.device)
    return lora_apply_unique(x, *gather_unique(A, B, slots, weights, rank, used))
