"""Batched multi-adapter ops shared by several methods (the LoRA family), and their row-by-row references
(``*_ref.py``, the test oracle). A method's own op lives in its folder (``hotswap.methods.<method>.ops``)."""

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
