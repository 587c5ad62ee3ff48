"""BitFit training (ours: PEFT has no bias-only method): trainable biases on the target linears (new zero biases
where the base has none), exported as bias deltas against the base."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from hotswap.errors import InvalidArgument
from hotswap.methods.bitfit.artifact import write_bitfit
from hotswap.methods.common import DEFAULT_TARGETS
from hotswap.methods.trainable import PlainSteps
from hotswap.registry import HOTSWAP_CONFIG
from hotswap.serve.adapters import target_linears


@dataclass(frozen=True)
class BitFitOptions:
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGETS, metadata={"help": "linear layers whose bias trains", "flag": "targets"}
    )


@dataclass
class BitFitTrainable(PlainSteps):
    model: torch.nn.Module
    biases: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]  # module name -> (trainable bias, its start)
    target_modules: tuple[str, ...]

    def export(self, out: Path) -> dict[str, float]:
        deltas = {f"{name}.bias": (p.detach() - start).float().cpu() for name, (p, start) in self.biases.items()}
        write_bitfit(out, deltas, self.target_modules)
        return {}


def attach_bitfit(model: torch.nn.Module, opts: BitFitOptions) -> BitFitTrainable:
    for p in model.parameters():
        p.requires_grad_(False)
    biases = {}
    for name, module in target_linears(model, opts.target_modules).items():  # exactly what the engine adapts
        if module.bias is None:
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
        module.bias.requires_grad_(True)
        biases[name] = (module.bias, module.bias.detach().clone())
    if not biases:
        raise InvalidArgument(f"no linear layer matches target modules {', '.join(opts.target_modules)}")
    return BitFitTrainable(model, biases, opts.target_modules)


def resume_bitfit(model: torch.nn.Module, parent: Path) -> BitFitTrainable:
    """Start from a published BitFit's biases; the export stays a delta against the base's biases."""
    config = json.loads((parent / HOTSWAP_CONFIG).read_text())
    trainable = attach_bitfit(model, BitFitOptions(tuple(config["target_modules"])))
    deltas = load_file(parent / "adapter_model.safetensors")
    for name, (bias, _start) in trainable.biases.items():
        if f"{name}.bias" in deltas:
            with torch.no_grad():
                bias += deltas[f"{name}.bias"].to(bias.dtype)
    return trainable
