"""Batched multi-adapter ops (fast) and their row-by-row references (``*_ref.py``, the test oracle)."""

from __future__ import annotations

from hotswap.serve.ops.lora import gather_rows, lora_apply, lora_delta, weighted_rows

__all__ = ["gather_rows", "lora_apply", "lora_delta", "weighted_rows"]
