"""Row-by-row reference for :mod:`hotswap.methods.bottleneck.ops`: plain fp32 loops."""

from __future__ import annotations

import torch

from hotswap.methods.bottleneck.ops import ACTIVATIONS, Bottleneck


def bottleneck_delta(
    x: torch.Tensor, y: torch.Tensor, entries: dict[int, Bottleneck], slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """out[b] = y[b] + sum_k weights[b, k] * (U act(D inp + b_D) + b_U), inp = y[b] (serial) or x[b]."""
    out = y.float().clone()
    for b in range(x.shape[0]):
        for k in range(slots.shape[1]):
            s = int(slots[b, k])
            if s not in entries:
                continue
            e = entries[s]
            inp = (y[b] if e.serial else x[b]).float()
            h = ACTIVATIONS[e.activation](inp @ e.down.float().T + e.down_bias.float())
            out[b] += float(weights[b, k]) * (h @ e.up.float().T + e.up_bias.float())
    return out
