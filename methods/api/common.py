"""What several method folders share: the default targets and how target names resolve against a base, writing
one artifact per seed from a single loaded base, and new-directory checks. (Reading lives in :mod:`.adapter`.)"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model

from hotswap.basemodel import load_model
from hotswap.errors import InvalidArgument, InvalidArtifact
from hotswap.fsutil import building_dir
from hotswap.methods.api import decoder_experts, decoder_linears, expert_projections, target_linears

ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head
DEFAULT_TARGETS = (ALL_LINEAR,)
# The help of a `target_modules` option defaulting to DEFAULT_TARGETS.
TARGETS_HELP = (
    f"module names (last part) of the linear layers to adapt; {ALL_LINEAR} (as in PEFT): every linear layer of the "
    "decoder blocks, e.g. q/k/v/o_proj and gate/up/down_proj on Llama, Mistral, Qwen, Gemma, OLMo 2 and Granite, "
    "qkv_proj, o_proj, gate_up_proj and down_proj on Phi-3 (fused)"
)
EXPERTS = "experts"  # every projection of every MoE layer's experts
PARAMETERS_HELP = (
    f"parameter names (last parts) to adapt directly, as PEFT's target_parameters; {EXPERTS}: every projection of "
    "every MoE layer's experts (e.g. mlp.experts.gate_up_proj and mlp.experts.down_proj), a LoRA per expert"
)
PathLike = str | os.PathLike[str]
# fill(name, parameter, its value at attach time, generator) -> the random value to save
Fill = Callable[[str, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def check_new(outs: Mapping[PathLike, int]) -> dict[Path, int]:
    paths = {Path(o): seed for o, seed in outs.items()}
    for out in paths:
        if out.exists():
            raise InvalidArtifact(f"{out}: already exists; write the adapter into a new directory")
    return paths


def resolve_targets(model: torch.nn.Module, target_modules: Sequence[str]) -> tuple[str, ...]:
    """The module names an adapter with ``target_modules`` adapts on ``model``: as given, or, for ``all-linear``,
    the names of every linear layer in the decoder blocks (the layers the engine can adapt), in the first block's
    order: one rule for PEFT's methods and ours, so their artifacts and the engine agree."""
    if ALL_LINEAR not in target_modules:
        return tuple(target_modules)
    if len(target_modules) > 1:
        raise InvalidArgument(f"{ALL_LINEAR} stands alone, got target modules {', '.join(target_modules)}")
    names = tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name in decoder_linears(model)))
    if not names:
        raise InvalidArgument(f"{type(model).__name__} has no linear layer in decoder blocks (model.layers.N)")
    return names


def resolve_parameters(model: torch.nn.Module, target_parameters: Sequence[str]) -> tuple[str, ...]:
    """PEFT ``target_parameters`` for ``model``: as given (each must name a parameter of ``model``, as PEFT matches
    them: the full path or its last parts), or, for ``experts``, every projection of the MoE layers' experts, named
    from inside a block (e.g. ``mlp.experts.down_proj``)."""
    if EXPERTS not in target_parameters:
        paths = [name for name, _ in model.named_parameters()]
        for target in target_parameters:
            if not any(p == target or p.endswith(f".{target}") for p in paths):
                raise InvalidArgument(f"target parameter {target!r} names no parameter of {type(model).__name__}")
        return tuple(target_parameters)
    if len(target_parameters) > 1:
        raise InvalidArgument(f"{EXPERTS} stands alone, got target parameters {', '.join(target_parameters)}")
    names = {
        f"{path.split('.layers.', 1)[1].partition('.')[2]}.{proj}"
        for path, experts in decoder_experts(model).items()
        for proj in expert_projections(getattr(experts, "base", experts))
    }
    if not names:
        raise InvalidArgument(f"{type(model).__name__} has no MoE experts in its decoder blocks to adapt")
    return tuple(sorted(names))


def adapted_linears(model: torch.nn.Module, target_modules: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The linears of ``model`` an adapter with ``target_modules`` adapts (module path -> layer); none is an error."""
    targets = resolve_targets(model, target_modules)
    linears = target_linears(model, targets)
    if not linears:
        raise InvalidArgument(f"no linear layer matches target modules {', '.join(targets)}")
    return linears


def target_names(linears: Mapping[str, torch.nn.Module]) -> tuple[str, ...]:
    """The target module names (last name parts) of adapted linears, sorted: what an artifact records."""
    return tuple(sorted({name.rsplit(".", 1)[-1] for name in linears}))


def save_variants(
    base: PathLike, make_config: Callable[[torch.nn.Module], PeftConfig], outs: Mapping[PathLike, int], fill: Fill
) -> list[Path]:
    """Attach ``make_config(the base)`` to the base once; for each (out, seed) re-fill the trainable weights and
    save."""
    paths = check_new(outs)
    model = load_model(base)
    config = make_config(model)
    try:
        peft_model = get_peft_model(model, config)
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


def base_linears(base: PathLike, target_modules: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The linears of the checkpoint at ``base`` that an adapter targeting ``target_modules`` adapts."""
    return adapted_linears(load_model(base), target_modules)
