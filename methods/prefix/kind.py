"""Prefix tuning's context kind: learned keys/values written at positions [0, P) of the row's cache in every
layer (never computed, so the text starts at position P)."""

from __future__ import annotations

import torch

from hotswap.methods.api import ContextKind, KVWriter, register_kind

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (kv_heads, P, head_dim) keys and values


@register_kind
class PrefixKind(ContextKind):
    name = "prefix"

    def set(self, slot: int, payload: KV | None) -> None:
        device = self.rows.device
        super().set(slot, None if payload is None else [(k.to(device), v.to(device)) for k, v in payload])

    def written(self, slot: int) -> int:
        return self.payloads[slot][0][0].shape[1]

    def write(self, slot: int, cache: KVWriter, row: int) -> None:
        cache.write_kv(row, self.payloads[slot])
