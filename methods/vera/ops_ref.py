"""Row-by-row reference for :mod:`hotswap.methods.vera.ops`: PEFT's VeRA formula from the raw vectors, per row, fp32."""

from __future__ import annotations

import torch

# slot -> (shared A (r, >= in), shared B (>= out, r), lambda_d (r,), lambda_b (out,))
Vectors = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def vera_linear(
    x: torch.Tensor, layer: torch.nn.Linear, adapters: Vectors, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """x [Bt, T, in] -> y [Bt, T, out] = layer(x[b]) + sum_k weights[b, k] * λ_b * (B_s (λ_d * (A_s x[b])))
    over the row's slots held in ``adapters``, with A_s, B_s the shared projections sliced to the layer."""
    rows = []
    for b in range(x.shape[0]):
        xb = x[b].float()
        y = torch.nn.functional.linear(xb, layer.weight.float(), None if layer.bias is None else layer.bias.float())
        for slot, w in zip(slots[b].tolist(), weights[b].tolist(), strict=True):
            if slot in adapters:
                shared_a, shared_b, lambda_d, lambda_b = (t.float() for t in adapters[slot])
                a = shared_a[:, : layer.in_features]
                b_ = shared_b[: layer.out_features]
                y = y + w * lambda_b * ((lambda_d * (xb @ a.T)) @ b_.T)
        rows.append(y)
    return torch.stack(rows)
