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
- per unique adapter (``unique_rows`` + ``gather_unique`` + ``lora_apply_unique``): the batch's U distinct adapters
  concatenated, two dense GEMMs for the whole batch and a per-row coefficient mask (none when every
  row uses the same adapters: one popular adapter costs two GEMMs per linear); reads each adapter
  once, so it wins when U is well below the batch size (popular adapters).

An MoE layer's experts get the same two paths per expert, on the tokens routed to it: the batch's distinct
adapters' factors of that expert (``gather_experts`` + ``expert_lora_apply``), or each token's own
(``expert_lora_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gather_rows(
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor | None,
    rank: int,
    truncation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row stacked factors. A: [S, R, in], B: [S, R, out] (scaling folded in), slots/weights: [Bt, K] (None:
    every weight 1); ``truncation`` [Bt, K, rank] (from :func:`rank_truncation`) scales each rank component per row.

    Returns A_rows [Bt, K*rank, in] and B_rows [Bt, K*rank, out] with each adapter's weight folded into B.
    """
    bt, k = slots.shape
    a = A[slots, :rank]  # (Bt, K, r, in)
    b = B[slots, :rank]  # (Bt, K, r, out)
    coef = None if weights is None else weights[:, :, None].to(B.dtype)  # (Bt, K, 1)
    if truncation is not None:
        coef = truncation.to(B.dtype) if coef is None else coef * truncation.to(B.dtype)  # (Bt, K, r)
    if coef is not None:  # one pass over the gathered B
        b = b * coef[..., None]
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


@dataclass(frozen=True)
class UniqueFactors:
    """The batch's U distinct adapters' factors, prepared once per batch plan for :func:`lora_apply_unique`.

    ``a_t`` [in, U*rank] (A transposed), ``b`` [U*rank, out]. ``coef`` [Bt, 1, U*rank] is each row's coefficient on
    each adapter and ``drop`` where it is zero; both are None when every row has the same coefficients (one popular
    adapter on the whole batch), which are then folded into ``b``: the forward is then two GEMMs and nothing else.
    ``coef`` alone is None when it is only ones and zeros."""

    a_t: torch.Tensor
    b: torch.Tensor
    coef: torch.Tensor | None
    drop: torch.Tensor | None


@dataclass(frozen=True)
class UniqueRows:
    """What :func:`gather_unique` needs of the batch beside one layer's slot tables: the distinct slots ``used``
    and each row's coefficients on them. The same for every layer of a batch plan at one rank, so a plan computes
    it once for all of them. ``scale`` [U*rank]: every row's coefficients where all rows are alike (None: all
    ones); else ``coef`` and ``drop`` as :class:`UniqueFactors` has them."""

    used: list[int]
    index: torch.Tensor  # (U,) long: ``used`` on the device
    scale: torch.Tensor | None
    coef: torch.Tensor | None
    drop: torch.Tensor | None


def _coefficients(slots: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
    """coef[b, u*rank:(u+1)*rank] = sum_k weights[b, k] * (slots[b, k] == idx[u]): (Bt, U*rank)."""
    onehot = (slots[:, :, None] == idx[None, None, :]).to(weights.dtype)  # (Bt, K, U)
    return torch.einsum("bk,bku->bu", weights, onehot).repeat_interleave(rank, dim=1)


def unique_rows(
    slots: torch.Tensor, weights: torch.Tensor, rank: int, used: list[int], dtype: torch.dtype
) -> UniqueRows:
    """Each row's coefficients (in ``dtype``, the factors') on the distinct slots ``used`` (U of them), where
    coef[b, 0, u*rank:(u+1)*rank] = sum_k weights[b, k] * (slots[b, k] == used[u])."""
    idx = torch.tensor(used, device=slots.device)
    coef = _coefficients(slots, weights, idx, rank)  # (Bt, U*r)
    if bool((coef == coef[:1]).all()):  # every row alike: fold the coefficients into B, no per-row mask
        return UniqueRows(used, idx, None if bool((coef[0] == 1).all()) else coef[0].to(dtype), None, None)
    drop = (coef == 0)[:, None, :]  # (Bt, 1, U*r)
    ones = bool(((coef == 0) | (coef == 1)).all())
    return UniqueRows(used, idx, None, None if ones else coef[:, None, :].to(dtype), drop)


def unique_factors(A: torch.Tensor, B: torch.Tensor, rows: UniqueRows, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the batch's distinct slots ``rows.used`` from slot tables A [S, R, in], B [S, R, out]: A
    transposed (in, U*rank) and B (U*rank, out). One slot's are views of its table rows; several are gathered. They
    depend on the distinct slots alone, so they hold while requests join and leave a batch of the same adapters."""
    if len(rows.used) == 1:
        return A[rows.used[0], :rank].t(), B[rows.used[0], :rank]
    return A[rows.index, :rank].reshape(-1, A.shape[-1]).t(), B[rows.index, :rank].reshape(-1, B.shape[-1])


def gather_unique(
    A: torch.Tensor,
    B: torch.Tensor,
    rows: UniqueRows,
    rank: int,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> UniqueFactors:
    """:func:`unique_factors` (or ``factors``, as it returned them for these slots) with the rows' coefficients:
    folded into B where every row has the same (one copy of B, none where they are all ones)."""
    a_t, b = factors if factors is not None else unique_factors(A, B, rows, rank)
    if rows.scale is not None:
        b = b * rows.scale[:, None]
    return UniqueFactors(a_t, b, rows.coef, rows.drop)


def lora_apply_unique(x: torch.Tensor, f: UniqueFactors, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [Bt, T, in] -> delta [Bt, T, out] = ((x @ a_t) * coef) @ b, added in place to ``out`` if given.

    A row's coefficient on an adapter it does not use is an exact zero, even where ``x @ a_t`` overflowed for
    that adapter (0 * inf would be NaN): one adapter can never reach another row."""
    bt, t, _ = x.shape
    h = torch.mm(x.reshape(bt * t, -1), f.a_t)  # (Bt*T, U*r)
    if f.drop is not None:
        h3 = h.view(bt, t, -1)
        if f.coef is not None:
            h3.mul_(f.coef)
        h3.masked_fill_(f.drop, 0.0)
    if out is None:
        return torch.mm(h, f.b).view(bt, t, -1)  # (Bt, T, out)
    out.view(bt * t, -1).addmm_(h, f.b)
    return out


def lora_delta_unique(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """The module docstring's ``delta`` through the per-unique-adapter path (same result as ``lora_delta``)."""
    used = sorted(set(slots.flatten().tolist()) - {0})
    if not used:
        return torch.zeros(*x.shape[:2], B.shape[-1], dtype=x.dtype, device=x.device)
    return lora_apply_unique(x, gather_unique(A, B, unique_rows(slots, weights, rank, used, A.dtype), rank))


@dataclass(frozen=True)
class ExpertFactors:
    """One projection of an MoE layer's experts: the batch's U distinct adapters' factors per expert, prepared once
    per batch plan for :func:`expert_lora_apply`. ``a`` [E, in, U*rank], ``b`` [E, U*rank, out] (scaling folded in),
    ``coef`` [Bt, U*rank]: each row's coefficient on each adapter's rank components (as :func:`unique_rows`)."""

    a: torch.Tensor
    b: torch.Tensor
    coef: torch.Tensor


def gather_experts(
    A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int, used: list[int]
) -> ExpertFactors:
    """A: [S, E, R, in], B: [S, E, R, out] slot tables of one projection -> the distinct slots ``used``' factors."""
    idx = torch.tensor(used, device=slots.device)
    u, e = len(used), A.shape[1]
    a = A[idx, :, :rank].transpose(0, 1).reshape(e, u * rank, A.shape[-1]).transpose(1, 2).contiguous()
    b = B[idx, :, :rank].transpose(0, 1).reshape(e, u * rank, B.shape[-1]).contiguous()
    return ExpertFactors(a, b, _coefficients(slots, weights, idx, rank).to(A.dtype))


def expert_lora_apply(x: torch.Tensor, f: ExpertFactors, expert: int, rows: torch.Tensor) -> torch.Tensor:
    """The delta [n, out] of ``expert`` on its routed tokens x [n, in] from batch rows ``rows`` [n]: two GEMMs over
    the batch's adapters, each token keeping its row's adapters only (an exact zero elsewhere, as
    :func:`lora_apply_unique`)."""
    coef = f.coef[rows]  # (n, U*r)
    h = (x @ f.a[expert]).mul_(coef).masked_fill_(coef == 0, 0.0)
    return h @ f.b[expert]


@dataclass(frozen=True)
class ExpertRows:
    """One projection of an MoE layer's experts, per token: the slot tables A [S, E, R, in], B [S, E, R, out] and the
    rows' ``slots`` / ``weights`` [Bt, K], nothing gathered per plan (for :func:`expert_lora_rows`)."""

    A: torch.Tensor
    B: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    rank: int


def expert_lora_rows(
    x: torch.Tensor, f: ExpertRows, experts: torch.Tensor, rows: torch.Tensor, budget: int = 1 << 22
) -> torch.Tensor:
    """The delta [n, out] of routed pairs x [n, in], pair i from batch row ``rows[i]`` to expert ``experts[i]``, from
    each pair's own adapters' factors of its expert (K per row), gathered for the routed pairs only: when the batch
    has about as many distinct adapters as rows, the GEMMs over all of them (:func:`expert_lora_apply`) would mostly
    multiply tokens by other rows' adapters. All experts at once, in chunks of at most ``budget`` gathered factor
    elements (a prefill routes many pairs)."""
    s = f.slots[rows]  # (n, K)
    w = f.weights[rows, :, None].to(x.dtype)  # (n, K, 1)
    e = experts[:, None]  # (n, 1)
    size = s.shape[1] * f.rank * max(f.A.shape[-1], f.B.shape[-1])  # gathered elements per pair
    step = max(1, budget // max(size, 1))
    out = x.new_empty(x.shape[0], f.B.shape[-1])
    for i in range(0, x.shape[0], step):
        c = slice(i, i + step)
        h = torch.einsum("ni,nkri->nkr", x[c], f.A[s[c], e[c], : f.rank]) * w[c]
        out[c] = torch.einsum("nkr,nkro->no", h, f.B[s[c], e[c], : f.rank])
    return out


def expert_lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    rank: int,
    expert: int,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Per token n of ``expert``: sum_k weights[rows[n], k] * x[n] @ A[s, expert, :rank].T @ B[s, expert, :rank] with
    s = slots[rows[n], k] (slot 0: zeros)."""
    used = sorted(set(slots.flatten().tolist()) - {0})
    if not used:
        return torch.zeros(x.shape[0], B.shape[-1], dtype=x.dtype, device=x.device)
    return expert_lora_apply(x, gather_experts(A, B, slots, weights, rank, used), expert, rows)
