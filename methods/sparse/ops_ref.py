"""Row-by-row reference for :mod:`hotswap.methods.sparse.ops`: densify each delta, plain fp32 loops."""

from __future__ import annotations

import torch


def sparse_delta(
    x: torch.Tensor,
    entries: dict[int, tuple[torch.Tensor, torch.Tensor]],
    out_features: int,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """delta[b] = sum_k weights[b, k] * x[b] @ dense(ΔW_{slots[b, k]}).T (slots without entries add nothing)."""
    in_features = x.shape[-1]
    out = torch.zeros(x.shape[0], x.shape[1], out_features, dtype=torch.float32)
    for b in range(x.shape[0]):
        for k in range(slots.shape[1]):
            s = int(slots[b, k])
            if s not in entries:
                continue
            idx, val = entries[s]
            dense = torch.zeros(out_features * in_features, dtype=torch.float32)
            dense[idx] = val.float()
            out[b] += float(weights[b, k]) * x[b].float() @ dense.view(out_features, in_features).T
    return out
