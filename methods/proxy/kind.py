"""Proxy-tuning rows: each resident proxy adapter's two small models run beside the base, per row.

A proxy adapter is a tuned small "expert" and its untuned "anti-expert"; a row using it gets
``weight * alpha * (expert - anti_expert)`` added to its next-token logits (and nothing else changes:
the base's forward, and any other adapter of the row, are as without it). Each small model gets its
own runner (the engine's, :class:`hotswap.methods.api.RowRunner`) with a per-row KV cache indexed by its rows, so
rows join and leave exactly as in the base. The small models see only the row's text tokens (prompt
and generated), at their own positions: a prefix or prompt-tuning adapter of the same row is the
base's context, not theirs. Different proxy adapters are different networks, so the batch is grouped
by adapter (one small-model forward per proxy adapter present, over all its rows); no engine we
compete with serves proxy-tuning, hence ours. Reference: :mod:`hotswap.methods.proxy.ops_ref`.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from hotswap.methods.api import EngineRows, LogitKind, LogitRow, RowRunner, register_kind


@dataclass
class ProxyModels:
    """A loaded proxy adapter (host copies of its two small models)."""

    expert: nn.Module
    anti_expert: nn.Module
    alpha: float
    anti_key: str  # the anti-expert's fingerprint: adapters with the same untuned model share its runner


@dataclass
class _Shared:
    runner: RowRunner
    users: int = 0


@register_kind
class ProxyKind(LogitKind):
    """The resident proxy adapters by slot (installed and evicted with the slot, like the layers' tables).

    Experts are per adapter; anti-experts are shared by fingerprint (adapters tuned from the same small
    model, the usual case, run one anti-expert forward for all their rows).
    """

    name = "proxy"

    def __init__(self, rows: EngineRows) -> None:
        super().__init__(rows)
        self._experts: dict[int, tuple[RowRunner, float, str]] = {}  # slot -> (expert, alpha, anti_key)
        self._anti: dict[str, _Shared] = {}

    def model_counts(self) -> tuple[int, int]:
        """(experts, anti-experts) resident."""
        return len(self._experts), len(self._anti)

    def set(self, slot: int, proxy: ProxyModels | None) -> None:
        super().set(slot, proxy)
        old = self._experts.pop(slot, None)
        if old is not None:
            shared = self._anti[old[2]]
            shared.users -= 1
            if shared.users == 0:
                del self._anti[old[2]]
        if proxy is None:
            return
        shared = self._anti.get(proxy.anti_key) or _Shared(self._runner(proxy.anti_expert))
        shared.users += 1
        self._anti[proxy.anti_key] = shared
        self._experts[slot] = (self._runner(proxy.expert), proxy.alpha, proxy.anti_key)

    def clear_row(self, row: int, end: int) -> None:
        """Zero every small model's cache row ``row`` up to ``end`` (the base row's bound covers theirs)."""
        for runner, _, _ in self._experts.values():
            runner.release(row, end)
        for shared in self._anti.values():
            shared.runner.release(row, end)

    def _runner(self, model: nn.Module) -> RowRunner:
        """A runner on the host copy itself when it already lives on the engine's device, else on a device copy."""
        if next(model.parameters()).device != self.rows.device:
            model = copy.deepcopy(model).to(self.rows.device)
        return self.rows.runner(model)

    def offsets(self, rows: list[LogitRow], last_only: bool) -> list[torch.Tensor | None]:
        """Per row, the sum over its proxy slots of ``weight * alpha * (expert - anti_expert)`` logits:
        (len(ids), V), or (V,) at the last token with ``last_only``; None for rows without a proxy slot.

        Each expert runs once over the rows using it, each shared anti-expert once over the rows using any
        adapter built on it; a row's offset is the coefficient-weighted sum of those logits."""
        experts: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))  # slot -> {row: coef}
        antis: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))  # anti_key -> {row: coef}
        for i, r in enumerate(rows):
            for slot, weight in r.slots:
                if slot in self._experts:
                    _, alpha, key = self._experts[slot]
                    experts[slot][i] += weight * alpha
                    antis[key][i] -= weight * alpha
        groups = [(self._experts[s][0], c) for s, c in experts.items()]
        groups += [(self._anti[k].runner, c) for k, c in antis.items()]
        out: list[torch.Tensor | None] = [None] * len(rows)
        for runner, coefs in groups:
            members = list(coefs)
            logits = self._logits(runner, [rows[i] for i in members], last_only)
            for k, i in enumerate(members):
                part = coefs[i] * logits[k]
                out[i] = part if out[i] is None else out[i] + part
        return out

    def _logits(self, runner: RowRunner, rows: list[LogitRow], last_only: bool) -> list[torch.Tensor]:
        """Per row, ``runner``'s logits over its tokens (len(ids), V), or (V,) at its last token."""
        embeds = [runner.embed_ids(r.ids) for r in rows]
        return runner.prefill([r.row for r in rows], embeds, [r.start for r in rows], all_positions=not last_only)
