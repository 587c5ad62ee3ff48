"""What several method folders share when writing artifacts: the default targets, writing one artifact per
seed from a single loaded base, and new-directory checks. (Reading lives in :mod:`hotswap.serve.adapters`.)"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model

from hotswap.basemodel import load_model
from hotswap.errors import InvalidArtifact
from hotswap.registry.fsutil import building_dir
from hotswap.serve.adapters import target_linears

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PathLike = str | os.PathLike[str]
# fill(name, parameter, its value at attach time, generator) -> the random value to save
Fill = Callable[[str, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def check_new(outs: Mapping[PathLike, int]) -> dict[Path, int]:
    paths = {Path(o): seed for o, seed in outs.items()}
    for out in paths:
        if out.exists():
            raise InvalidArtifact(f"{out}: already exists; write the adapter into a new directory")
    return paths


def save_variants(base: PathLike, config: PeftConfig, outs: Mapping[PathLike, int], fill: Fill) -> list[Path]:
    """Attach ``config`` to the base once; for each (out, seed) re-fill the trainable weights and save."""
    paths = check_new(outs)
    try:
        peft_model = get_peft_model(load_model(base), config)
    except ValueError as e:  # PEFT's message for targets the base lacks
        raise InvalidArtifact(f"cannot attach {config.peft_type} to {base}: {e}") from e
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in trainable.items()}
    for out, seed in paths.items():
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(fill(name, param, initial[name], gen))
        with building_dir(out) as tmp:
            peft_model.save_pretrained(tmp)
    return list(paths)


def gaussian(std: float) -> Fill:
    return lambda _name, param, _initial, gen: torch.randn(param.shape, generator=gen) * std


def base_linears(base: PathLike, target_modules: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The linears of the checkpoint at ``base`` that an adapter targeting ``target_modules`` adapts."""
    linears = target_linears(load_model(base), target_modules)
    if not linears:
        raise InvalidArtifact(f"no linear layer of {base} matches {', '.join(target_modules)}")
    return linears  # type: ignore[return-value]
