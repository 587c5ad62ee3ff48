"""Batched multi-adapter ops (fast) and their row-by-row references (``*_ref.py``, the test oracle)."""

from __future__ import annotations

from hotswap.serve.ops.bottleneck import Bottleneck, bottleneck_apply, bottleneck_delta, gather_bottleneck
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
from hotswap.serve.ops.sparse import gather_sparse, sparse_apply, sparse_delta

__all__ = [
    "Bottleneck",
    "bottleneck_apply",
    "bottleneck_delta",
    "gather_bottleneck",
    "gather_rows",
    "gather_sparse",
    "gather_unique",
    "lora_apply",
    "lora_apply_unique",
    "lora_delta",
    "lora_delta_unique",
    "rank_truncation",
    "sparse_apply",
    "sparse_delta",
    "weighted_rows",
]
