"""Batched sparse weight deltas (Child-tuning, FishMask): each row adds x @ ΔW_s^T for its adapter
slots, with ΔW_s a sparse (out, in) matrix, never written into W. Two forms, both one sparse product
per layer for the whole batch (no Python loop over rows or adapters), prepared once per batch plan:

- block-diagonal (``coef`` None): every row's own weighted entries in one (Bt*out, Bt*in) matrix
  times the rows' stacked inputs; exactly the work the rows need, but an adapter used by several
  rows is stored once per row. Used while that stays under ``BLOCK_DIAGONAL_MAX_ENTRIES``.
- stacked-unique: the batch's U distinct adapters in one (U*out, in) matrix times every row's input,
  each row then keeping its own blocks with its weights; memory is one copy per adapter, work is
  U times a row's share. The fallback for dense-ish deltas (Child-tuning at 20 %) in big batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

BLOCK_DIAGONAL_MAX_ENTRIES = 1 << 21  # per layer and batch plan (~25 MB of indices and values)


@dataclass(frozen=True)
class SparsePlan:
    mat: torch.Tensor  # CSR: (Bt*out, Bt*in) block-diagonal, or (U*out, in) stacked-unique
    coef: torch.Tensor | None  # stacked-unique: each row's weight on each adapter [Bt, U]; None: block-diagonal


def _csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # the loader already checked every index against the layer's shape
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return coo.coalesce().to_sparse_csr()


def gather_sparse(
    entries: dict[int, tuple[torch.Tensor, torch.Tensor]],
    used: list[int],
    out_features: int,
    in_features: int,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> SparsePlan:
    """entries[slot] = (flat indices into the row-major (out, in) matrix, values); ``used`` the batch's
    sparse slots. Picks the form (module docstring) and builds its matrix."""
    device = slots.device
    idx_cat = torch.cat([entries[s][0] for s in used])
    val_cat = torch.cat([entries[s][1] for s in used])
    sizes = torch.tensor([entries[s][0].numel() for s in used], device=device)
    local = torch.full((int(slots.max()) + 1,), -1, dtype=torch.long, device=device)
    local[torch.tensor(used, device=device)] = torch.arange(len(used), device=device)
    loc = local[slots]  # (Bt, K): each row's slots as indices into ``used`` (-1: not sparse)
    pair_b, pair_k = ((loc >= 0) & (weights != 0)).nonzero(as_tuple=True)
    pair_u, pair_w = loc[pair_b, pair_k], weights[pair_b, pair_k]
    counts = sizes[pair_u]
    bt = slots.shape[0]
    if int(counts.sum()) <= BLOCK_DIAGONAL_MAX_ENTRIES:
        starts = torch.cumsum(sizes, 0) - sizes  # each adapter's first entry in the concatenation
        pair = torch.repeat_interleave(torch.arange(len(pair_u), device=device), counts)
        offset = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        entry = starts[pair_u][pair] + offset
        flat, row = idx_cat[entry], pair_b[pair]
        rows = flat // in_features + row * out_features
        cols = flat % in_features + row * in_features
        vals = val_cat[entry] * pair_w[pair].to(val_cat.dtype)
        return SparsePlan(_csr(rows, cols, vals, (bt * out_features, bt * in_features)), None)
    u_of_entry = torch.repeat_interleave(torch.arange(len(used), device=device), sizes)
    rows = idx_cat // in_features + u_of_entry * out_features
    mat = _csr(rows, idx_cat % in_features, val_cat, (len(used) * out_features, in_features))
    coef = torch.zeros(bt, len(used), dtype=weights.dtype, device=device)
    coef.index_put_((pair_b, pair_u), pair_w, accumulate=True)
    return SparsePlan(mat, coef)


def sparse_apply(x: torch.Tensor, plan: SparsePlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [Bt, T, in] -> delta [Bt, T, out] = sum_k w[b, k] * x[b] @ ΔW_{slot[b, k]}^T (added to ``out``)."""
    bt, t, d_in = x.shape
    if plan.coef is None:
        y = torch.sparse.mm(plan.mat, x.permute(0, 2, 1).reshape(bt * d_in, t))  # (Bt*out, T)
        delta = y.view(bt, -1, t).permute(0, 2, 1)
    else:
        u = plan.coef.shape[1]
        y = torch.sparse.mm(plan.mat, x.reshape(bt * t, d_in).T.contiguous()).view(u, -1, bt, t)  # (U, out, Bt, T)
        used = (plan.coef != 0).T[:, None, :, None]  # (U, 1, Bt, 1): an unused adapter's overflow stays out
        delta = torch.einsum("bu,uobt->bto", plan.coef.to(y.dtype), torch.where(used, y, 0.0))
    return delta if out is None else out.add_(delta)


def sparse_delta(
    x: torch.Tensor,
    entries: dict[int, tuple[torch.Tensor, torch.Tensor]],
    out_features: int,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The whole op for x [Bt, T, in] (both halves; the layer caches the first per batch plan)."""
    used = sorted({int(s) for s in slots.flatten().tolist()} & set(entries))
    return sparse_apply(x, gather_sparse(entries, used, out_features, x.shape[-1], slots, weights))
