"""The multi-adapter modules: a frozen base module plus per-slot deltas, applied row by row.

At start-up every linear layer of the base's decoder blocks and its output head are wrapped once by
:class:`MultiAdapterLinear`, every MoE layer's experts (transformers' stacked expert weights) by
:class:`MultiAdapterExperts`, and the input embedding by :class:`MultiAdapterEmbedding`. Each keeps its
base module untouched (weights never change) and, per resident adapter slot, that adapter's delta for it, held by
kinds (:class:`hotswap.methods.api.SlotKind` / :class:`~hotswap.methods.api.ExpertKind`, each registered by its
method folder). A kind is created the first time one of its payloads is installed, so the module never names a
method. Before each forward the engine sets the shared :class:`~hotswap.methods.api.BatchPlan` (which slots, with
which weights, each row uses); each kind gathers its rows once per plan and adds its delta with its batched op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, EmbeddingKind, ExpertKind, LinearDelta, SlotKind, SlotTable, slot_kind


class MultiAdapterModule(nn.Module):
    """A frozen base module and its kinds' per-slot tables; the forward is the subclass's."""

    def __init__(self, base: nn.Module, plan: BatchPlan, num_slots: int, dtype: torch.dtype) -> None:
        """``dtype``: the model's compute dtype (the deltas'; a quantized ``base`` keeps its own weights)."""
        super().__init__()
        self.base, self.dtype = base, dtype
        self.plan = plan
        self.num_slots = num_slots  # resident slots; tables have num_slots + 1 rows (slot 0 = zero)
        self.kinds: dict[str, SlotTable] = {}  # created on first install, kept in application order
        self._cached_version = -1
        self._states: list[tuple[Any, Any]] = []
        # Set by the static decode (serve.model.graphs): the states a traced or captured step reads, so that its
        # forward never consults the plan (None: the plan's, gathered on demand).
        self.fixed: list[tuple[Any, Any]] | None = None
        self.epoch = 0  # bumped whenever the states are recomputed (a captured step copies them in then)

    # Slot tables are ordinary tensors even when written from the engine's inference-mode loop, so
    # any later write (forward_logits, unload) can update them in place.
    @torch.inference_mode(False)
    @torch.no_grad()
    def set_slot(self, slot: int, delta: LinearDelta | None) -> None:
        """Install (or with ``None`` clear) one adapter's delta in ``slot``. Never during a forward."""
        assert 1 <= slot <= self.num_slots
        parts = delta.parts if delta is not None else {}
        for name in parts:
            if name not in self.kinds:
                self.kinds[name] = slot_kind(name)(self.base, self.num_slots, self.dtype)
                self.kinds = dict(sorted(self.kinds.items(), key=lambda kv: kv[1].order))
        for name, kind in self.kinds.items():
            kind.set(slot, parts.get(name))
        self._cached_version = -1

    def batch_states(self) -> list[tuple[Any, Any]]:
        """Each kind's gathered rows for the current plan (empty without adapters), computed once per plan version
        (a new list whenever recomputed)."""
        plan = self.plan
        if self._cached_version != plan.version:
            self._states = []
            for kind in self.kinds.values():
                used = sorted(s for s in plan.used if kind.holds(s))
                if used:
                    self._states.append((kind, kind.gather(plan, used)))
            self._cached_version = plan.version
            self.epoch += 1
        return self._states

    def states(self) -> list[tuple[Any, Any]]:
        """The states this forward applies: the static decode's, or the plan's (empty without adapters)."""
        if self.fixed is not None:
            return self.fixed
        return self.batch_states() if self.plan.used else []


class MultiAdapterLinear(MultiAdapterModule):
    """A frozen ``nn.Linear`` plus per-slot adapter deltas applied row by row, never merged into W."""

    base: nn.Linear
    # CPU threads for the base product where a step runs on fewer (0: the step's own). The engine decodes on one
    # thread, since fork/join costs each small op more than a second thread gains, but a decode batch's base product
    # streams megabytes of weights: on W1 (2 cores) the step's base products took 120 ms on one thread, 83 ms on two
    # with the thread count switched around each of them, 81 ms with the whole step on two.
    base_threads = 0

    def _base(self, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """The base product of ``x`` (..., in), plus ``into`` (..., out) where given (written in place)."""
        if not self.base_threads or torch.compiler.is_compiling():  # a traced step keeps its threads
            return self._product(x, into)
        before = torch.get_num_threads()
        if before >= self.base_threads:
            return self._product(x, into)
        torch.set_num_threads(self.base_threads)
        try:
            return self._product(x, into)
        finally:
            torch.set_num_threads(before)

    def _product(self, x: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        # The product of a float nn.Linear is accumulated into the output (a GEMM with beta = 1) where measured to
        # pay: into the additive deltas, computed first (then the deltas and the base product write the output once
        # each, where adding the deltas after reads and writes it again), and on a CPU in float32 into zeros as well
        # (or into the bias): in W1's decode step (16 rows, the step on one thread and each product on two) the base
        # step took 0.85-0.90x the time with zeros + addmm_ than with nn.Linear's own mm, interleaved step by step,
        # though a steady two-thread loop of either alone runs at the same speed (in bfloat16 and float16 on a CPU,
        # addmm_ is slower).
        # Other modules and weights (quantized ones) run their own forward.
        weight, bias = self.base.weight, self.base.bias
        plain = type(self.base) is nn.Linear and type(weight) in (nn.Parameter, torch.Tensor)
        accumulate = plain and (x.dtype == torch.float32 if x.device.type == "cpu" else into is not None)
        if not accumulate:
            y = self.base(x)
            return y if into is None else into.add_(y)
        if into is None:
            shape = (*x.shape[:-1], weight.shape[0])
            into = x.new_zeros(shape) if bias is None else bias.expand(shape).clone()
        elif bias is not None:
            into.add_(bias)
        into.view(-1, weight.shape[0]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        return into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states: list[tuple[SlotKind, Any]] = self.states()
        if not states:
            return self._base(x)
        if x.dim() == 2:  # the batch's rows one after the other (e.g. a shared expert inside an MoE block)
            assert self.plan.slots is not None
            return self.forward(x.view(self.plan.slots.shape[0], -1, x.shape[-1])).flatten(0, 1)
        x_base = x
        for kind, state in states:
            if type(kind).scale_input is not SlotKind.scale_input:
                x_base = kind.scale_input(x_base, state)
        # The leading kinds whose deltas read the input alone add them up first; when that is every kind,
        # the base product accumulates into their sum.
        deltas, first = None, 0
        if x_base is x:  # no kind scaled the input
            for kind, state in states:
                d = kind.additive(x, state, deltas)
                if d is None:
                    break
                deltas, first = d, first + 1
        if first == len(states):
            return self._base(x, deltas)
        base_out = self._base(x_base)  # (Bt, T, out)
        y = base_out if deltas is None else deltas.add_(base_out)
        for kind, state in states[first:]:
            y = kind.apply(x, base_out, y, state)
        return y


class MultiAdapterEmbedding(MultiAdapterModule):
    """The frozen input embedding plus per-slot deltas of its rows, applied row by row: called on ``ids`` (Bt, T), the
    batch's rows as the plan has them."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        states: list[tuple[EmbeddingKind, Any]] = self.states()
        for kind, state in states:
            y = kind.apply(ids, y, state)
        return y


# deltas(projection name, the pairs' inputs (n, in) sorted by expert, their tokens (n,), their experts (n,), the
# pairs per expert) -> the sum of the kinds' deltas (n, out), or None
Deltas = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, list[int]], torch.Tensor | None]


class MultiAdapterExperts(MultiAdapterModule):
    """An MoE layer's frozen experts plus per-slot expert deltas (e.g. a low-rank delta per expert), applied to the
    tokens routed to each expert with their row's adapters, never merged into the stacked weights. Called as the experts
    are, by the family's own MoE block: ``(hidden_states (N, hidden), top_k_index (N, k), top_k_weights (N, k))``, the
    N tokens being the batch's rows one after the other (the block flattens (rows, T))."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        states: list[tuple[ExpertKind, Any]] = self.states()
        if not states:
            return self.base(hidden, top_k_index, top_k_weights)  # the family's own experts implementation
        assert self.plan.slots is not None
        n = hidden.shape[0]
        token_rows = torch.arange(n, device=hidden.device) // (n // self.plan.slots.shape[0])

        def deltas(
            proj: str, x: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor, counts: list[int]
        ) -> torch.Tensor | None:
            out = None
            for kind, state in states:
                d = kind.delta(proj, x, token_rows[tokens], experts, counts, state)
                if d is not None:
                    out = d if out is None else out + d
            return out

        return routed_experts(self.base, hidden, top_k_index, top_k_weights, deltas)


def _projections(experts: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")


def _project(experts: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's projection ``name`` of ``x`` (n, in), with its bias where the experts have biases."""
    w = getattr(experts, name)[expert]
    y = x @ w if experts.is_transposed else nn.functional.linear(x, w)
    return y + getattr(experts, f"{name}_bias")[expert] if experts.has_bias else y


def _activate(experts: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return experts._apply_gate(y) if experts.has_gate else experts.act_fn(y)


def routed_experts(
    experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, deltas: Deltas
) -> torch.Tensor:
    """The experts' output (N, hidden) for N tokens, each through its k routed experts weighted and summed, with the
    deltas added to each expert's projections before its activation. The (token, expert) pairs are sorted by expert
    so that each expert's base product runs once, on its own tokens (as transformers' grouped implementation does);
    the deltas are computed for all pairs at once per projection (a kind may batch them across experts)."""
    k, num = top_k_index.shape[1], experts.num_experts
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num).tolist()[:num]  # ids past the experts (expert parallelism's
    n = sum(counts)  # sentinels) sort last and are left out
    order = order[:n]
    tokens, pair_experts = order // k, ids[order]
    h = hidden[tokens]
    for name in _projections(experts):
        y = torch.empty(n, getattr(experts, name).shape[2 if experts.is_transposed else 1], dtype=h.dtype,
                        device=h.device)  # fmt: skip
        start = 0
        for expert, count in enumerate(counts):
            if count:
                y[start : start + count] = _project(experts, name, expert, h[start : start + count])
            start += count
        d = deltas(name, h, tokens, pair_experts, counts)
        y = y if d is None else y + d
        h = y if name == "down_proj" else _activate(experts, y)
    if experts.has_post_expert_norm:
        h = experts.post_expert_norm(h)
    weighted = h * top_k_weights.reshape(-1)[order, None].to(h.dtype)
    return torch.zeros_like(hidden).index_add_(0, tokens, weighted)


def routed_experts_ref(
    experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, deltas: Deltas
) -> torch.Tensor:
    """:func:`routed_experts` token by token: the plain reference."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            counts = [int(i == e) for i in range(experts.num_experts)]
            token, expert = torch.tensor([t], device=hidden.device), torch.tensor([e], device=hidden.device)
            h = hidden[t : t + 1]
            for name in _projections(experts):
                y = _project(experts, name, e, h)
                d = deltas(name, h, token, expert, counts)
                y = y if d is None else y + d
                h = y if name == "down_proj" else _activate(experts, y)
            if experts.has_post_expert_norm:
                h = experts.post_expert_norm(h)
            out[t] += top_k_weights[t, j] * h[0]
    return out
