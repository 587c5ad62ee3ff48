"""Row-by-row references for :mod:`hotswap.methods.lora.ops`: same signatures, plain fp32 loops."""

from __future__ import annotations

import torch


def lora_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """delta[b] = sum_k weights[b, k] * x[b] @ A[slots[b, k], :rank].T @ B[slots[b, k], :rank]."""
    out = torch.zeros(x.shape[0], x.shape[1], B.shape[-1], dtype=torch.float32)
    for b in range(x.shape[0]):
        for k in range(slots.shape[1]):
            s, w = int(slots[b, k]), float(weights[b, k])
            out[b] += w * (x[b].float() @ A[s, :rank].float().T) @ B[s, :rank].float()
    return out


def truncated_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    slot_ranks: list[int],
    row_ranks: list[int],
) -> torch.Tensor:
    """DyLoRA: row b uses each adapter truncated to c = min(row_ranks[b], r) (0 = r) with scale r / c:
    delta[b] = sum_k weights[b, k] * (r / c) * x[b] @ A[s, :c].T @ B[s, :c]."""
    out = torch.zeros(x.shape[0], x.shape[1], B.shape[-1], dtype=torch.float32)
    for b in range(x.shape[0]):
        for k in range(slots.shape[1]):
            s, w = int(slots[b, k]), float(weights[b, k])
            r = slot_ranks[s]
            c = row_ranks[b] if 0 < row_ranks[b] < r else r
            if r:
                out[b] += w * (r / c) * (x[b].float() @ A[s, :c].float().T) @ B[s, :c].float()
    return out


def expert_lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    rank: int,
    expert: int,
    rows: torch.Tensor,
) -> torch.Tensor:
    """delta[n] = sum_k weights[rows[n], k] * x[n] @ A[s, expert, :rank].T @ B[s, expert, :rank], with
    s = slots[rows[n], k]."""
    out = torch.zeros(x.shape[0], B.shape[-1], dtype=torch.float32)
    for n in range(x.shape[0]):
        b = int(rows[n])
        for k in range(slots.shape[1]):
            s, w = int(slots[b, k]), float(weights[b, k])
            out[n] += w * (x[n].float() @ A[s, expert, :rank].float().T) @ B[s, expert, :rank].float()
    return out
