"""Synthetic adapters: real artifacts with random, non-zero weights and fixed seeds.

Benchmarks (shared/BENCHMARK.md: "random non-zero A and B with a fixed seed, so the delta is real"),
tests and the demo need adapters before any training. PEFT methods are exactly PEFT's files, loadable
by ``PeftModel.from_pretrained``; BitFit is hotswap's documented format. The plural functions write
many adapters of one config from a single loaded base (one per seed).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file
from transformers import PreTrainedModel

from hotswap.basemodel import fingerprint, load_model
from hotswap.errors import InvalidArtifact
from hotswap.registry import HOTSWAP_CONFIG
from hotswap.registry.fsutil import building_dir

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PathLike = str | os.PathLike[str]
# fill(name, parameter, its value at attach time, generator) -> the random value to save
Fill = Callable[[str, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class RandomLoraConfig:
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # scaling numerator: delta = (alpha / r) * B @ A
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)  # module name suffixes to adapt
    use_dora: bool = False  # DoRA: add PEFT's magnitude vector (random around the base column norms)
    seed: int = 0  # fixes A, B (and DoRA magnitudes) for random_lora
    init_std: float = 0.02  # std of the random A and B entries

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArtifact(f"rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise InvalidArtifact("target_modules must name at least one module")


def _check_new(outs: Mapping[PathLike, int]) -> dict[Path, int]:
    paths = {Path(o): seed for o, seed in outs.items()}
    for out in paths:
        if out.exists():
            raise InvalidArtifact(f"{out}: already exists; write the adapter into a new directory")
    return paths


def _save_variants(base: PathLike, config: PeftConfig, outs: Mapping[PathLike, int], fill: Fill) -> list[Path]:
    """Attach ``config`` to the base once; for each (out, seed) re-fill the trainable weights and save."""
    paths = _check_new(outs)
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


def random_loras(base: PathLike, outs: Mapping[PathLike, int], config: RandomLoraConfig) -> list[Path]:
    """PEFT LoRA (or DoRA) adapters for the base at ``base``: one per (directory, seed), random A and B."""
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        use_dora=config.use_dora,
        lora_dropout=0.0,
        bias="none",
    )

    def fill(name: str, param: torch.Tensor, initial: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(param.shape, generator=gen)
        if "lora_magnitude_vector" in name:  # around PEFT's init, the base's column norms
            return initial * (1.0 + 0.1 * noise)
        return noise * config.init_std

    return _save_variants(base, peft_config, outs, fill)


def random_lora(base: PathLike, out_dir: PathLike, config: RandomLoraConfig) -> Path:
    """One random LoRA/DoRA adapter (seed ``config.seed``)."""
    return random_loras(base, {out_dir: config.seed}, config)[0]


def _gaussian(std: float) -> Fill:
    return lambda _name, param, _initial, gen: torch.randn(param.shape, generator=gen) * std


def random_prefixes(base: PathLike, outs: Mapping[PathLike, int], num_virtual_tokens: int = 8) -> list[Path]:
    """PEFT prefix-tuning adapters (no projection) with random key/value prefixes."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return _save_variants(base, config, outs, _gaussian(1.0))


def random_prefix(base: PathLike, out_dir: PathLike, num_virtual_tokens: int = 8, seed: int = 0) -> Path:
    return random_prefixes(base, {out_dir: seed}, num_virtual_tokens)[0]


def random_prompts(base: PathLike, outs: Mapping[PathLike, int], num_virtual_tokens: int = 8) -> list[Path]:
    """PEFT prompt-tuning adapters with random virtual-token embeddings."""
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return _save_variants(base, config, outs, _gaussian(0.05))


def random_prompt(base: PathLike, out_dir: PathLike, num_virtual_tokens: int = 8, seed: int = 0) -> Path:
    return random_prompts(base, {out_dir: seed}, num_virtual_tokens)[0]


def _target_linears(base: PathLike, target_modules: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The base's linear layers whose last name part is in ``target_modules`` (at least one, or InvalidArtifact)."""
    linears = {
        name: module
        for name, module in load_model(base).named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }
    if not linears:
        raise InvalidArtifact(f"no linear layer of {base} matches {', '.join(target_modules)}")
    return linears


def random_bitfits(
    base: PathLike, outs: Mapping[PathLike, int], target_modules: tuple[str, ...] = DEFAULT_TARGETS, std: float = 0.02
) -> list[Path]:
    """hotswap BitFit artifacts: ``hotswap_config.json`` + ``<module>.bias`` deltas for matching linears."""
    paths = _check_new(outs)
    shapes = {name: module.out_features for name, module in _target_linears(base, target_modules).items()}
    for out, seed in paths.items():
        gen = torch.Generator().manual_seed(seed)
        tensors = {f"{name}.bias": torch.randn(n, generator=gen) * std for name, n in shapes.items()}
        with building_dir(out) as tmp:
            write_bitfit(tmp, tensors, target_modules)
    return list(paths)


def write_sparse(
    out: Path, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], method: str, target_modules: tuple[str, ...]
) -> None:
    """THE sparse-delta artifact format (Child-tuning, FishMask): ``hotswap_config.json`` + one
    ``<module>.weight.indices`` (int64, flat row-major into the (out, in) weight) and
    ``<module>.weight.values`` (the deltas, float32) per touched linear."""
    tensors = {}
    for module, (idx, val) in deltas.items():
        tensors[f"{module}.weight.indices"] = idx.to(torch.int64).contiguous()
        tensors[f"{module}.weight.values"] = val.float().contiguous()
    nnz = sum(int(idx.numel()) for idx, _ in deltas.values())
    config = {"method": method, "target_modules": sorted(target_modules), "format": "sparse deltas", "nnz": nnz}
    save_file(tensors, out / "adapter_model.safetensors")
    (out / HOTSWAP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def random_sparses(
    base: PathLike,
    outs: Mapping[PathLike, int],
    method: str = "fishmask",
    density: float = 0.005,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    std: float = 0.05,
) -> list[Path]:
    """Sparse-delta adapters (``method`` fishmask or child-tuning) with random positions and values."""
    paths = _check_new(outs)
    shapes = {name: module.weight.shape for name, module in _target_linears(base, target_modules).items()}
    for out, seed in paths.items():
        gen = torch.Generator().manual_seed(seed)
        deltas = {}
        for name, (rows, cols) in shapes.items():
            nnz = max(1, int(density * rows * cols))
            idx = torch.randperm(rows * cols, generator=gen)[:nnz].sort().values
            deltas[name] = (idx, torch.randn(nnz, generator=gen) * std)
        with building_dir(out) as tmp:
            write_sparse(tmp, deltas, method, target_modules)
    return list(paths)


def random_sparse(base: PathLike, out_dir: PathLike, method: str = "fishmask", density: float = 0.005,
                  seed: int = 0, std: float = 0.05) -> Path:  # fmt: skip
    return random_sparses(base, {out_dir: seed}, method, density, std=std)[0]


BOTTLENECK_TARGETS = ("o_proj", "down_proj")  # the attention and feed-forward sublayers' outputs


def write_bottleneck(
    out: Path, modules: dict[str, dict[str, torch.Tensor]], bottleneck_dim: int, activation: str, placement: str
) -> None:
    """THE bottleneck artifact format: ``hotswap_config.json`` + per adapted linear
    ``<module>.adapter_down.weight`` (m, d), ``.adapter_down.bias`` (m), ``<module>.adapter_up.weight``
    (out, m), ``.adapter_up.bias`` (out); d is the layer's output size (serial) or input size (parallel)."""
    tensors = {
        f"{module}.adapter_{k}": v.float().contiguous() for module, parts in modules.items() for k, v in parts.items()
    }
    config = {"method": "bottleneck", "bottleneck_dim": bottleneck_dim, "activation": activation,
              "placement": placement, "modules": sorted(modules)}  # fmt: skip
    save_file(tensors, out / "adapter_model.safetensors")
    (out / HOTSWAP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def random_bottlenecks(
    base: PathLike,
    outs: Mapping[PathLike, int],
    bottleneck_dim: int = 16,
    activation: str = "relu",
    placement: str = "serial",
    std: float = 0.05,
) -> list[Path]:
    """Bottleneck adapters on every block's o_proj and down_proj with random non-zero weights."""
    paths = _check_new(outs)
    layers = _target_linears(base, BOTTLENECK_TARGETS)
    for out, seed in paths.items():
        gen = torch.Generator().manual_seed(seed)
        modules = {}
        for name, layer in layers.items():
            d = layer.out_features if placement == "serial" else layer.in_features
            modules[name] = {
                "down.weight": torch.randn(bottleneck_dim, d, generator=gen) * std,
                "down.bias": torch.randn(bottleneck_dim, generator=gen) * std,
                "up.weight": torch.randn(layer.out_features, bottleneck_dim, generator=gen) * std,
                "up.bias": torch.randn(layer.out_features, generator=gen) * std,
            }
        with building_dir(out) as tmp:
            write_bottleneck(tmp, modules, bottleneck_dim, activation, placement)
    return list(paths)


PROXY_EXPERT, PROXY_ANTI_EXPERT = "expert", "anti_expert"


def write_proxy(out: Path, expert: PreTrainedModel, anti_expert: PreTrainedModel, alpha: float) -> None:
    """THE proxy-tuning artifact format: ``hotswap_config.json`` {"method": "proxy", "alpha", "expert",
    "anti_expert", ...} and the two small models as ``save_pretrained`` checkpoints (config.json +
    model.safetensors) in ``expert/`` and ``anti_expert/``. Served logits: base + alpha * (expert - anti_expert)."""
    for sub, model in ((PROXY_EXPERT, expert), (PROXY_ANTI_EXPERT, anti_expert)):
        model.save_pretrained(out / sub, safe_serialization=True)
    config = {
        "method": "proxy",
        "alpha": alpha,
        "expert": PROXY_EXPERT,
        "anti_expert": PROXY_ANTI_EXPERT,
        "anti_expert_fingerprint": fingerprint(out / PROXY_ANTI_EXPERT),
        "vocab_size": expert.config.vocab_size,
    }
    (out / HOTSWAP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def random_proxies(small: PathLike, outs: Mapping[PathLike, int], alpha: float = 1.0, std: float = 0.02) -> list[Path]:
    """Proxy adapters whose anti-expert is the ``small`` checkpoint and whose expert is it plus random
    noise of ``std`` on every weight (one expert per seed)."""
    paths = _check_new(outs)
    anti_expert = load_model(small)
    for out, seed in paths.items():
        expert = copy.deepcopy(anti_expert)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in expert.parameters():
                p += torch.randn(p.shape, generator=gen) * std
        with building_dir(out) as tmp:
            write_proxy(tmp, expert, anti_expert, alpha)
    return list(paths)


def write_bitfit(out: Path, deltas: dict[str, torch.Tensor], target_modules: tuple[str, ...]) -> None:
    """THE BitFit artifact format: ``hotswap_config.json`` + ``adapter_model.safetensors`` holding one
    ``<module>.bias`` delta per adapted linear (added to the base's bias; layers without one gain it)."""
    config = {"method": "bitfit", "target_modules": sorted(target_modules), "format": "bias deltas"}
    save_file(deltas, out / "adapter_model.safetensors")
    (out / HOTSWAP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def random_bitfit(
    base: PathLike,
    out_dir: PathLike,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    return random_bitfits(base, {out_dir: seed}, target_modules, std)[0]
