"""The multi-adapter linear layer: a frozen base linear plus per-slot deltas, applied row by row.

At start-up every linear layer of the base's decoder blocks is wrapped once by :class:`MultiAdapterLinear`.
It keeps the base layer untouched (weights never change) and, per resident adapter slot, that adapter's delta
for this layer, held by slot kinds (:class:`hotswap.methods.api.SlotKind`, each registered by its method folder).
A kind is created the first time one of its payloads is installed, so the layer never names a method. Before
each forward the engine sets the shared :class:`~hotswap.methods.api.BatchPlan` (which slots, with which weights,
each row uses); each kind gathers its rows once per plan and adds its delta with its batched op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hotswap.methods.api import BatchPlan, LinearDelta, SlotKind, slot_kind


class MultiAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-slot adapter deltas applied row by row, never merged into W."""

    def __init__(self, base: nn.Linear, plan: BatchPlan, num_slots: int, dtype: torch.dtype) -> None:
        """``dtype``: the model's compute dtype (the deltas'; a quantized ``base`` keeps its own weights)."""
        super().__init__()
        self.base, self.dtype = base, dtype
        self.plan = plan
        self.num_slots = num_slots  # resident slots; tables have num_slots + 1 rows (slot 0 = zero)
        self.kinds: dict[str, SlotKind] = {}  # created on first install, kept in application order
        self._cached_version = -1
        self._states: list[tuple[SlotKind, Any]] = []
        # Set by the static decode (serve.model.graphs): the states a traced or captured step reads, so that its
        # forward never consults the plan (None: the plan's, gathered on demand).
        self.fixed: list[tuple[SlotKind, Any]] | None = None
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

    def batch_states(self) -> list[tuple[SlotKind, Any]]:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            states = self.fixed
        elif self.plan.used:
            states = self.batch_states()
        else:
            return self.base(x)
        x_base = x
        for kind, state in states:
            if type(kind).scale_input is not SlotKind.scale_input:
                x_base = kind.scale_input(x_base, state)
        base_out = self.base(x_base)  # (Bt, T, out)
        y = base_out
        for kind, state in states:
            y = kind.apply(x, base_out, y, state)
        return y
