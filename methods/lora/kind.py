"""LoRA's kinds: on linears, per-slot factors padded to a common rank, DoRA's per-output scale, and per-row ranks;
on an MoE layer's experts, per-slot factors of every expert of each adapted projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, ExpertKind, SlotKind, expert_projections, register_kind, weighted_rows
from hotswap.methods.lora.ops import (
    ExpertFactors,
    ExpertRows,
    expert_lora_apply,
    expert_lora_rows,
    gather_experts,
    gather_rows,
    gather_unique,
    lora_apply,
    lora_apply_unique,
    rank_truncation,
    unique_factors,
    unique_rows,
)


def put_ranked(table: torch.Tensor, slot: int, value: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``table`` (slots+1, ...) with ``value`` in row ``slot``, its rank along the row's dimension ``dim``: the table
    grows (zeros) along it when ``value`` needs more rank than it holds, and the rest of the row's rank capacity reads
    as zero (None clears the row). Returns the table, a new one if it grew. One rule for every LoRA slot table."""
    r = 0 if value is None else value.shape[dim]
    grow = r - table.shape[dim + 1]
    if grow > 0:
        table = torch.nn.functional.pad(table, [0, 0] * (table.dim() - dim - 2) + [0, grow])
    row = table[slot]
    if value is not None:
        row.narrow(dim, 0, r).copy_(value)
    row.narrow(dim, r, row.shape[dim] - r).zero_()
    return table


@dataclass(frozen=True)
class LoraFactors:
    """LoRA's payload: A (r, in), B (r, out) with the scaling (and DoRA's magnitude scale) folded in, and DoRA's
    per-output scale m / ||W + s B A|| - 1 (None for plain LoRA), which scales the base output."""

    A: torch.Tensor
    B: torch.Tensor
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@register_kind
class LoraKind(SlotKind):
    """LoRA-family deltas (LoRA, DoRA, AdaLoRA/PLoRA/DyLoRA exports): slot tables padded to a common rank."""

    name = "lora"
    order = 10

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.A = self._empty(0, base.in_features)  # (slots+1, R, in)
        self.B = self._empty(0, base.out_features)  # (slots+1, R, out)
        self.dora: torch.Tensor | None = None  # (slots+1, out), allocated on the first DoRA adapter
        self.slot_rank = [0] * (num_slots + 1)
        self.slot_dora = [False] * (num_slots + 1)
        # The last plan's distinct slots and rank, and their factors (unique path): kept while the next plans have
        # the same adapters (requests join and leave), so that a batch change copies no factors; cleared by set().
        self._unique: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        # The per-row factors of the last plans of the last two shapes (rows, slots per row, rank), with their rows.
        # Under continuous batching a request that ends leaves its row to the next one, and the engine alternates a
        # plan of the rows prefilling with the decode plan: the next decode plan differs from the last in a row or
        # two, and only those are copied, in place (16 rows of 16 distinct adapters on W1: 60 ms a plan change when
        # all were, about half a decode step). So a layer may hold one more plan's per-row factors than the plan in
        # use (the prefill's, small). Cleared by set().
        self._per_row: dict[tuple[int, int, int], tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def set(self, slot: int, payload: LoraFactors | None) -> None:
        r = 0 if payload is None else payload.rank
        self.A = put_ranked(self.A, slot, None if payload is None else payload.A, 0)
        self.B = put_ranked(self.B, slot, None if payload is None else payload.B, 0)
        dora = payload is not None and payload.dora_scale is not None
        if dora and self.dora is None:
            self.dora = self._empty(self.base.out_features)
        if self.dora is not None:
            self.dora[slot] = payload.dora_scale if dora else 0  # type: ignore[union-attr]
        self.slot_rank[slot], self.slot_dora[slot] = r, dora
        self._unique = None
        self._per_row = {}

    def holds(self, slot: int) -> bool:
        return self.slot_rank[slot] > 0

    def gather(self, plan: BatchPlan, used: list[int]) -> tuple:
        assert plan.slots is not None and plan.weights is not None
        rank = max(self.slot_rank[s] for s in used)
        weights = plan.nonunit_weights  # plain adapters: B's rows as they are
        # Few distinct adapters for many rows: read each adapter once (dense path); else per row. One adapter takes
        # the dense path on any batch, a prefill chunk of one row too: its factors are read in place, where the per-row
        # path copies them at each batch change (under continuous batching, at every request's prefill).
        if plan.ranks is None and (len(used) == 1 or 2 * len(used) <= plan.slots.shape[0]):
            rows = plan.shared(("lora unique", tuple(used), rank, self.dtype),
                               lambda: unique_rows(plan.slots, plan.weights, rank, used, self.dtype))  # fmt: skip
            key = (tuple(used), rank)
            if self._unique is None or self._unique[0] != key:
                self._unique = (key, unique_factors(self.A, self.B, rows, rank))
            lora = ("unique", gather_unique(self.A, self.B, rows, rank, self._unique[1]))
        else:
            self._unique = None  # held no longer than a plan uses it
            if plan.ranks is not None:  # DyLoRA rows at a chosen rank: the per-row path truncates
                slot_ranks = torch.tensor(self.slot_rank, device=plan.slots.device)
                trunc = rank_truncation(slot_ranks, plan.slots, plan.ranks, rank)
                lora = ("rows", *gather_rows(self.A, self.B, plan.slots, weights, rank, trunc))
            else:
                lora = ("rows", *self._rows_factors(plan, rank))
        dora = None
        if self.dora is not None and any(self.slot_dora[s] for s in used):
            dora = weighted_rows(self.dora, plan.slots, weights)[:, None, :]  # (Bt, 1, out)
        return lora, dora

    def _rows_factors(self, plan: BatchPlan, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-row path's factors: the last plan's of this shape with the rows that changed copied in place, or
        gathered anew."""
        assert plan.slots is not None
        shape = (*plan.slots.shape, rank)
        cached = self._per_row.pop(shape, None)
        if cached is None:
            a_rows, b_rows = gather_rows(self.A, self.B, plan.slots, plan.nonunit_weights, rank)
        else:
            before, a_rows, b_rows = cached
            # the same for every layer whose last plan of this shape had these rows: computed once per plan
            changed = plan.shared(("lora rows changed", before), lambda: _changed_rows(before, plan))
            if changed is not None:
                idx, slots, weights = changed
                a, b = gather_rows(self.A, self.B, slots, weights, rank)
                a_rows.index_copy_(0, idx, a)
                b_rows.index_copy_(0, idx, b)
        self._per_row[shape] = (plan.rows, a_rows, b_rows)
        if len(self._per_row) > 2:  # the least recently used shape goes
            del self._per_row[next(iter(self._per_row))]
        return a_rows, b_rows

    def additive(self, x: torch.Tensor, state: tuple, into: torch.Tensor | None) -> torch.Tensor | None:
        lora, dora = state
        return _lora_delta(x, lora, out=into) if dora is None else None  # DoRA scales the base output

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: tuple) -> torch.Tensor:
        lora, dora = state
        if dora is not None:  # DoRA: (m/||W+sBA|| - 1) * (W x), the bias excluded; one pass over the output
            y = torch.addcmul(y, dora, base_out)  # a new tensor: base_out may be y, and a later kind's to read
            if self.base.bias is not None:
                y.sub_(dora * self.base.bias)
        return _lora_delta(x, lora, out=y)  # accumulate in place: y is a fresh tensor owned by this forward


def _changed_rows(before: tuple, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The rows of ``plan`` whose (slot, weight) pairs differ from ``before`` (an earlier plan's rows, as many): their
    indices, slots and weights (None: all ones); None where none differs."""
    assert plan.slots is not None
    changed = [i for i, (old, new) in enumerate(zip(before, plan.rows, strict=True)) if old != new]
    if not changed:
        return None
    idx = torch.tensor(changed, device=plan.slots.device)
    weights = plan.nonunit_weights
    return idx, plan.slots[idx], None if weights is None else weights[idx]


def _lora_delta(x: torch.Tensor, lora: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
    """The gathered factors' delta for ``x`` by the path :meth:`LoraKind.gather` chose, added in place to ``out`` if
    given."""
    return lora_apply_unique(x, lora[1], out=out) if lora[0] == "unique" else lora_apply(x, *lora[1:], out=out)


@dataclass(frozen=True)
class ExpertLoraFactors:
    """LoRA on an MoE layer's experts (PEFT's ``target_parameters``): per projection (the experts' parameter name),
    A (E, r, in) and B (E, r, out) of every expert, the scaling folded into B."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[1] for a, _ in self.factors.values())


@register_kind
class ExpertLoraKind(ExpertKind):
    """LoRA on experts: per projection, slot tables (slots+1, E, R, in) / (slots+1, E, R, out) padded to a common
    rank; a batch of few distinct adapters reads each once (:func:`gather_experts`), else each routed token reads
    its own (:class:`ExpertRows`)."""

    name = "expert_lora"
    order = 10

    def __init__(self, base: nn.Module, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.shapes = expert_projections(base)  # projection -> (in, out)
        self.A: dict[str, torch.Tensor] = {}  # projection -> (slots+1, E, R, in), created on its first adapter
        self.B: dict[str, torch.Tensor] = {}
        self.slot_rank: dict[str, list[int]] = {}

    def set(self, slot: int, payload: ExpertLoraFactors | None) -> None:
        factors = {} if payload is None else payload.factors
        for proj in factors.keys() - self.A.keys():
            (n_in, n_out), experts = self.shapes[proj], factors[proj][0].shape[0]
            self.A[proj], self.B[proj] = self._empty(experts, 0, n_in), self._empty(experts, 0, n_out)
            self.slot_rank[proj] = [0] * (self.num_slots + 1)
        for proj in self.A:
            a, b = factors.get(proj, (None, None))
            self.A[proj] = put_ranked(self.A[proj], slot, a, 1)  # (E, r, in) per slot
            self.B[proj] = put_ranked(self.B[proj], slot, b, 1)
            self.slot_rank[proj][slot] = 0 if a is None else a.shape[1]

    def holds(self, slot: int) -> bool:
        return any(ranks[slot] for ranks in self.slot_rank.values())

    def gather(self, plan: BatchPlan, used: list[int]) -> dict[str, ExpertFactors | ExpertRows]:
        assert plan.slots is not None and plan.weights is not None
        state: dict[str, ExpertFactors | ExpertRows] = {}
        for proj, ranks in self.slot_rank.items():
            if holding := [s for s in used if ranks[s]]:
                rank = max(ranks[s] for s in holding)
                a, b = self.A[proj], self.B[proj]
                # as LoraKind: few distinct adapters for many rows read each adapter once, else each token its own
                if 2 * len(holding) <= plan.slots.shape[0]:
                    state[proj] = gather_experts(a, b, plan.slots, plan.weights, rank, holding)
                else:
                    state[proj] = ExpertRows(a, b, plan.slots, plan.weights, rank)
        return state

    def delta(
        self,
        proj: str,
        x: torch.Tensor,
        rows: torch.Tensor,
        experts: torch.Tensor,
        counts: list[int],
        state: dict[str, ExpertFactors | ExpertRows],
    ) -> torch.Tensor | None:
        f = state.get(proj)
        if f is None:
            return None
        if isinstance(f, ExpertRows):  # every pair at once, each reading its own adapters' factors of its expert
            return expert_lora_rows(x, f, experts, rows)
        out = x.new_zeros(x.shape[0], f.b.shape[-1])
        start = 0
        for expert, count in enumerate(counts):  # each expert on its pairs, over the batch's distinct adapters
            if count:
                part = slice(start, start + count)
                out[part] = expert_lora_apply(x[part], f, expert, rows[part])
            start += count
        return out
