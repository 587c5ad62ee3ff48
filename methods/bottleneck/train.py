"""Adapter-tuning with bottleneck modules (Houlsby et al.): a small down-projection, a nonlinearity
and an up-projection after the attention and feed-forward sublayers of every block (their output
linears, o_proj and down_proj), added to the sublayer's output before the residual. Serial placement
reads the sublayer's output; parallel placement reads its input. The up-projection starts at zero, so
training starts from the base model exactly. PEFT has no bottleneck adapters, so this is ours.

Artifact: ``hotswap.methods.bottleneck.artifact.write_bottleneck``; the engine serves it per row
(``hotswap.methods.bottleneck.ops``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hotswap.errors import InvalidArgument
from hotswap.methods.api.common import adapted_linears
from hotswap.methods.api.trainable import PlainSteps
from hotswap.methods.bottleneck.artifact import BOTTLENECK_TARGETS, write_bottleneck
from hotswap.methods.bottleneck.ops import ACTIVATIONS

PLACEMENTS = ("serial", "parallel")


@dataclass(frozen=True)
class BottleneckOptions:
    bottleneck_dim: int = field(default=16, metadata={"help": "hidden size m of each module"})
    activation: str = field(default="relu", metadata={"help": "nonlinearity", "choices": tuple(ACTIVATIONS)})
    placement: str = field(
        default="serial",
        metadata={"help": "after (serial) or beside (parallel) the sublayer", "choices": ("serial", "parallel")},
    )
    target_modules: tuple[str, ...] = field(
        default=BOTTLENECK_TARGETS,
        metadata={
            "help": "linear layers to adapt: the sublayers' output projections (the same names in every tested family)",
            "flag": "targets",
        },
    )

    def __post_init__(self) -> None:
        if self.bottleneck_dim < 1:
            raise InvalidArgument(f"bottleneck_dim must be >= 1, got {self.bottleneck_dim}")
        if self.activation not in ACTIVATIONS:
            raise InvalidArgument(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.placement not in PLACEMENTS:
            raise InvalidArgument(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")


class BottleneckLinear(nn.Module):
    """``base`` (frozen) followed by (serial) or beside (parallel) a trainable bottleneck, float32 whatever the
    base's dtype (as PEFT keeps its adapters): it computes in float32 and adds in the base's dtype."""

    def __init__(self, base: nn.Linear, dim: int, activation: str, serial: bool) -> None:
        super().__init__()
        self.base, self.activation, self.serial = base, activation, serial
        device = base.weight.device
        self.down = nn.Linear(base.out_features if serial else base.in_features, dim, device=device)
        self.up = nn.Linear(dim, base.out_features, device=device)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = ACTIVATIONS[self.activation](self.down((y if self.serial else x).float()))  # (..., dim)
        return y + self.up(h).to(y.dtype)


@dataclass
class BottleneckTrainable(PlainSteps):
    model: nn.Module
    options: BottleneckOptions
    modules: dict[str, BottleneckLinear]

    def export(self, out: Path) -> dict[str, float]:
        parts = {
            name: {
                "down.weight": m.down.weight.detach().cpu(),
                "down.bias": m.down.bias.detach().cpu(),
                "up.weight": m.up.weight.detach().cpu(),
                "up.bias": m.up.bias.detach().cpu(),
            }
            for name, m in self.modules.items()
        }
        o = self.options
        write_bottleneck(out, parts, o.bottleneck_dim, o.activation, o.placement)
        return {}


def attach_bottleneck(model: nn.Module, opts: BottleneckOptions) -> BottleneckTrainable:
    model.requires_grad_(False)
    modules = {}
    for full, child in adapted_linears(model, opts.target_modules).items():
        parent, _, child_name = full.rpartition(".")
        wrapped = BottleneckLinear(child, opts.bottleneck_dim, opts.activation, opts.placement == "serial")
        setattr(model.get_submodule(parent), child_name, wrapped)
        modules[full] = wrapped
    return BottleneckTrainable(model, opts, modules)
