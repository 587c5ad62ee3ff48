"""Synthetic adapters: real PEFT artifacts with random, non-zero weights and a fixed seed.

Benchmarks (shared/BENCHMARK.md: "random non-zero A and B with a fixed seed, so the delta is real"),
tests and the demo need adapters before any training; these are exactly PEFT's files, loadable by
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file

from hotswap.basemodel import load_model
from hotswap.errors import InvalidArtifact
from hotswap.registry import HOTSWAP_CONFIG
from hotswap.registry.fsutil import building_dir

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RandomLoraConfig:
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # scaling numerator: delta = (alpha / r) * B @ A
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)  # module name suffixes to adapt
    use_dora: bool = False  # DoRA: add PEFT's magnitude vector (random around the base column norms)
    seed: int = 0  # fixes A, B (and DoRA magnitudes)
    init_std: float = 0.02  # std of the random A and B entries

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArtifact(f"rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise InvalidArtifact("target_modules must name at least one module")


def random_lora(base: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: RandomLoraConfig) -> Path:
    """Write a PEFT LoRA (or DoRA) adapter for the base checkpoint at ``base`` with random A and B."""
    out = Path(out_dir)
    if out.exists():
        raise InvalidArtifact(f"{out}: already exists; write the adapter into a new directory")
    model = load_model(base)
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        use_dora=config.use_dora,
        lora_dropout=0.0,
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:  # PEFT's message for targets the base lacks
        raise InvalidArtifact(f"cannot attach LoRA to {base}: {e}") from e
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * config.init_std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    with building_dir(out) as tmp:
        peft_model.save_pretrained(tmp)
    return out


def _randomised_peft(base: str | os.PathLike[str], peft_config: object, out_dir: Path, seed: int, std: float) -> Path:
    """Attach a PEFT prompt-learning method, fill its trainable weights with N(0, std), save PEFT's files."""
    if out_dir.exists():
        raise InvalidArtifact(f"{out_dir}: already exists; write the adapter into a new directory")
    peft_model = get_peft_model(load_model(base), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    with building_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
    return out_dir


def random_prefix(
    base: str | os.PathLike[str], out_dir: str | os.PathLike[str], num_virtual_tokens: int = 8, seed: int = 0
) -> Path:
    """A PEFT prefix-tuning adapter (no projection) with random key/value prefixes."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return _randomised_peft(base, config, Path(out_dir), seed, std=1.0)


def random_prompt(
    base: str | os.PathLike[str], out_dir: str | os.PathLike[str], num_virtual_tokens: int = 8, seed: int = 0
) -> Path:
    """A PEFT prompt-tuning adapter with random virtual-token embeddings."""
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return _randomised_peft(base, config, Path(out_dir), seed, std=0.05)


def random_bitfit(
    base: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """A hotswap BitFit artifact: ``hotswap_config.json`` + ``<module>.bias`` deltas for matching linears."""
    out = Path(out_dir)
    if out.exists():
        raise InvalidArtifact(f"{out}: already exists; write the adapter into a new directory")
    model = load_model(base)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"{name}.bias": torch.randn(module.out_features, generator=gen) * std
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }
    if not tensors:
        raise InvalidArtifact(f"no linear layer of {base} matches {', '.join(target_modules)}")
    with building_dir(out) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors")
        config = {"method": "bitfit", "target_modules": sorted(target_modules), "format": "bias deltas"}
        (tmp / HOTSWAP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
