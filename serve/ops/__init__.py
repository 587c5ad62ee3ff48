"""Batched multi-adapter ops (fast) and their row-by-row references (``*_ref.py``, the test oracle)."""

from __future__ import annotations

from hotswap.serve.ops.lora import (
    gather_rows,
    gather_unique,
    lora_apply,
    lora_apply_unique,
    lora_delta,
    lora_delta_unique,
    rank_truncation,
    weighted_rows,
)

__all__ = [
    "gather_rows",
    "gather_unique",
    "lora_apply",
    "lora_apply_unique",
    "lora_delta",
    "lora_delta_unique",
    "rank_truncation",
    "weighted_rows",
]
