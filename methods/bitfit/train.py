"""BitFit training (ours: PEFT has no bias-only method): a trainable bias delta on each target linear's output,
exported as the bias deltas the artifact holds. The deltas are float32 whatever the base's dtype (the base's own
biases stay frozen), as PEFT keeps its adapters: a half-precision bias would lose BitFit's small updates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from hotswap.formats import HOTSWAP_CONFIG
from hotswap.methods.api.common import DEFAULT_TARGETS, TARGETS_HELP, adapted_linears, target_names
from hotswap.methods.api.trainable import PlainSteps
from hotswap.methods.bitfit.artifact import write_bitfit

DELTA = "bitfit_delta"  # the parameter each adapted linear gains


@dataclass(frozen=True)
class BitFitOptions:
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": TARGETS_HELP, "flag": "targets"})


@dataclass
class BitFitTrainable(PlainSteps):
    model: torch.nn.Module
    deltas: dict[str, torch.nn.Parameter]  # module name -> its trainable bias delta (out_features,), float32

    def export(self, out: Path) -> dict[str, float]:
        tensors = {f"{name}.bias": delta.detach().float().cpu() for name, delta in self.deltas.items()}
        write_bitfit(out, tensors, target_names(self.deltas))
        return {}


def _add_delta(module: torch.nn.Linear, _inputs: object, out: torch.Tensor) -> torch.Tensor:
    return out + getattr(module, DELTA).to(out.dtype)  # (..., out_features)


def attach_bitfit(model: torch.nn.Module, opts: BitFitOptions) -> BitFitTrainable:
    model.requires_grad_(False)
    deltas = {}
    for name, module in adapted_linears(model, opts.target_modules).items():  # exactly what the engine adapts
        delta = torch.nn.Parameter(torch.zeros(module.out_features, device=module.weight.device))
        module.register_parameter(DELTA, delta)
        module.register_forward_hook(_add_delta)
        deltas[name] = delta
    return BitFitTrainable(model, deltas)


def resume_bitfit(model: torch.nn.Module, parent: Path) -> BitFitTrainable:
    """Start from a published BitFit's bias deltas."""
    config = json.loads((parent / HOTSWAP_CONFIG).read_text())
    trainable = attach_bitfit(model, BitFitOptions(tuple(config["target_modules"])))
    published = load_file(parent / "adapter_model.safetensors")
    with torch.no_grad():
        for name, delta in trainable.deltas.items():
            if f"{name}.bias" in published:
                delta.copy_(published[f"{name}.bias"])
    return trainable
