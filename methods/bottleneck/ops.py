"""Batched bottleneck adapters (Houlsby-style): per row, out += Σ_k w_k · U_s(act(D_s(inp) + b_D) + ...) + b_U
with ``inp`` the layer's output (serial placement: after the sublayer) or its input (parallel).

The activation is elementwise, so several adapters of a batch concatenate along the bottleneck
dimension exactly like LoRA ranks: one GEMM into the stacked bottlenecks of the batch's U distinct
adapters, the activation, a per-row mask-and-weight over the stacked columns, one GEMM out. Adapters
differing in placement or activation form separate groups (at most a handful), never a loop over
rows or adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


@dataclass(frozen=True)
class Bottleneck:
    """One adapter's bottleneck at one linear: down (m, d), down_bias (m,), up (out, m), up_bias (out,)."""

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor
    activation: str = "relu"
    serial: bool = True  # True: reads the layer's output; False (parallel): reads its input

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.down_bias, self.up, self.up_bias))


@dataclass(frozen=True)
class _Group:
    serial: bool
    activation: str
    down: torch.Tensor  # (M, d): the group's adapters stacked
    down_bias: torch.Tensor  # (M,)
    up: torch.Tensor  # (out, M)
    scale: torch.Tensor  # (Bt, 1, M): each row's weight on each stacked column (0 for others' adapters)
    up_bias: torch.Tensor  # (Bt, 1, out): each row's weighted sum of its adapters' up biases


def gather_bottleneck(
    entries: dict[int, Bottleneck], used: list[int], slots: torch.Tensor, weights: torch.Tensor
) -> list[_Group]:
    """Prepare the batch's groups (once per batch plan) from the bottlenecks of the slots in ``used``."""
    groups = []
    kinds = sorted({(entries[s].serial, entries[s].activation) for s in used})
    for serial, activation in kinds:
        members = [s for s in used if (entries[s].serial, entries[s].activation) == (serial, activation)]
        index = torch.tensor(members, device=slots.device)
        onehot = (slots[:, :, None] == index[None, None, :]).to(weights.dtype)  # (Bt, K, G)
        coef = torch.einsum("bk,bkg->bg", weights, onehot)  # (Bt, G)
        sizes = torch.tensor([entries[s].down.shape[0] for s in members], device=slots.device)
        dtype = entries[members[0]].up.dtype
        up_bias = coef.to(dtype) @ torch.stack([entries[s].up_bias for s in members])  # (Bt, out)
        groups.append(
            _Group(
                serial=serial,
                activation=activation,
                down=torch.cat([entries[s].down for s in members]),
                down_bias=torch.cat([entries[s].down_bias for s in members]),
                up=torch.cat([entries[s].up for s in members], dim=1),
                scale=coef.repeat_interleave(sizes, dim=1)[:, None, :].to(dtype),
                up_bias=up_bias[:, None, :],
            )
        )
    return groups


def bottleneck_apply(x: torch.Tensor, y: torch.Tensor, groups: list[_Group]) -> torch.Tensor:
    """Add every group's bottleneck outputs to ``y`` [Bt, T, out] in place (``x`` [Bt, T, in] is the input)."""
    base = y.clone() if any(g.serial for g in groups) else y  # serial adapters all read the same output
    for g in groups:
        inp = base if g.serial else x
        h = ACTIVATIONS[g.activation](inp @ g.down.T + g.down_bias)  # (Bt, T, M)
        y.add_((h * g.scale) @ g.up.T + g.up_bias)
    return y


def bottleneck_delta(
    x: torch.Tensor, y: torch.Tensor, entries: dict[int, Bottleneck], slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The whole op: ``y`` plus the rows' bottleneck outputs (a new tensor; both halves of the layer's path)."""
    used = sorted({int(s) for s in slots.flatten().tolist()} & set(entries))
    return bottleneck_apply(x, y.clone(), gather_bottleneck(entries, used, slots, weights))
