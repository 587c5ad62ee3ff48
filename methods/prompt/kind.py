"""Prompt tuning's context kind: learned virtual-token embeddings computed before the row's text."""

from __future__ import annotations

import torch

from hotswap.methods.api import ContextKind, register_kind


@register_kind
class VirtualTokensKind(ContextKind):
    name = "virtual_tokens"

    def set(self, slot: int, payload: torch.Tensor | None) -> None:  # (T, hidden)
        super().set(slot, None if payload is None else payload.to(self.rows.device, self.rows.dtype))

    def computed(self, slot: int) -> int:
        return self.payloads[slot].shape[0]

    def extend(self, slot: int, emb: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.payloads[slot].to(emb.dtype), emb])  # (T + L, hidden), virtual tokens first
