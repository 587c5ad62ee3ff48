"""Row-by-row reference for :mod:`hotswap.methods.ia3.ops`: each row's scale from its own adapters, fp32."""

from __future__ import annotations

import torch


def ia3_linear(
    x: torch.Tensor,
    layer: torch.nn.Linear,
    vectors: dict[int, tuple[torch.Tensor, bool]],
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """x [Bt, T, in] -> y [Bt, T, out]; ``vectors[slot] = (l, feedforward)``: l scales the input (feedforward)
    or the output of ``layer``, for the rows using that slot, weighted as the module docstring says."""
    rows = []
    for b in range(x.shape[0]):
        s_in = torch.ones(layer.in_features)
        s_out = torch.ones(layer.out_features)
        for slot, w in zip(slots[b].tolist(), weights[b].tolist(), strict=True):
            if slot in vectors:
                scale, feedforward = vectors[slot]
                if feedforward:
                    s_in = s_in + w * (scale.float() - 1)
                else:
                    s_out = s_out + w * (scale.float() - 1)
        rows.append(torch.nn.functional.linear(x[b].float() * s_in, layer.weight.float(), _bias(layer)) * s_out)
    return torch.stack(rows)


def _bias(layer: torch.nn.Linear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.float()
