"""The engine-wide kinds of the resident adapters: context kinds (what comes before a row's text) and logit kinds
(an offset on a row's next-token logits), each defined and registered by its method folder
(:mod:`hotswap.methods.api`). One instance per kind, created the first time an adapter with a payload of that
kind is installed, holding that payload per resident slot, so the engine names no method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hotswap.methods.api import AdapterKind, ContextKind, EngineRows, KVWriter, LogitKind, LogitRow, adapter_kind


class EngineKinds:
    def __init__(self, rows: EngineRows) -> None:
        self.rows = rows
        self.kinds: dict[str, AdapterKind] = {}

    def set_slot(self, slot: int, parts: Mapping[str, Any]) -> None:
        """Install an adapter's engine-wide payloads in ``slot`` (an empty mapping clears the slot)."""
        for name in parts:
            if name not in self.kinds:
                self.kinds[name] = adapter_kind(name)(self.rows)
        for name, kind in self.kinds.items():
            kind.set(slot, parts.get(name))

    def clear_row(self, row: int, end: int) -> None:
        for kind in self.kinds.values():
            kind.clear_row(row, end)

    def _holding(self, family: type[AdapterKind], slots: list[tuple[int, float]]) -> list[tuple[Any, int]]:
        return [(k, s) for k in self.kinds.values() if isinstance(k, family) for s, _ in slots if k.holds(s)]

    def context_positions(self, slots: list[tuple[int, float]]) -> int:
        """Cache positions a row with these adapter slots has before its text."""
        return sum(k.written(s) + k.computed(s) for k, s in self._holding(ContextKind, slots))

    def offset_logits(self, slots: list[tuple[int, float]]) -> bool:
        """Whether a row with these slots gets logit offsets (its kinds must see its whole text)."""
        return bool(self._holding(LogitKind, slots))

    def context(
        self, cache: KVWriter, row: int, position: int, slots: list[tuple[int, float]], emb: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        """A row's embeddings to compute, from its text's (L, hidden), with its context adapter applied, and
        (offset, skip): the embeddings start at cache position ``offset`` (positions [0, offset) are written, on
        the row's first chunk, i.e. before ``position`` reaches them), and their first ``skip`` are virtual."""
        offset = skip = 0
        for kind, slot in self._holding(ContextKind, slots):
            offset, skip = kind.written(slot), kind.computed(slot)
            if position < offset:
                kind.write(slot, cache, row)
            emb = kind.extend(slot, emb)
        return emb, offset, skip

    def offsets(self, rows: list[LogitRow | None], last_only: bool) -> list[torch.Tensor | None]:
        """Per row (None: nothing fed this step), the sum of its logit kinds' offsets, or None without any."""
        fed = [r for r in rows if r is not None]
        out: list[torch.Tensor | None] = [None] * len(fed)
        for kind in self.kinds.values():
            if isinstance(kind, LogitKind):
                for i, part in enumerate(kind.offsets(fed, last_only)):
                    if part is not None:
                        out[i] = part if out[i] is None else out[i] + part
        parts = iter(out)
        return [None if r is None else next(parts) for r in rows]

    @property
    def any_logits(self) -> bool:
        """Whether any logit kind holds an adapter (a step feeds them only then)."""
        return any(isinstance(k, LogitKind) and k.payloads for k in self.kinds.values())
