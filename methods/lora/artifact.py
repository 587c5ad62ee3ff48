"""LoRA and DoRA artifacts: PEFT's own files (``adapter_config.json`` + ``adapter_model.safetensors``). The reader
also serves every method published in PEFT's LoRA format (AdaLoRA, PLoRA, DyLoRA exports), and LoRA on an MoE
layer's experts (PEFT's ``target_parameters``); the writers make random ones for tests and benchmarks
(``factors.py`` writes LoRA files from per-layer factors)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig

from hotswap.errors import ArtifactRejected, InvalidArtifact, UnsupportedAdapter
from hotswap.formats import PEFT_CONFIG
from hotswap.methods.api import (
    WEIGHTS,
    BaseInfo,
    LinearDelta,
    LoadedAdapter,
    check_shape,
    dense_weight,
    expert_projections,
    read_json,
    read_tensors,
    target_linear,
)
from hotswap.methods.api.common import DEFAULT_TARGETS, PathLike, resolve_parameters, resolve_targets, save_variants
from hotswap.methods.lora.config import rank_and_scaling
from hotswap.methods.lora.embedding import read_embedding_parts
from hotswap.methods.lora.kind import ExpertLoraFactors, ExpertLoraKind, LoraFactors, LoraKind

_PEFT_PREFIX = "base_model.model."
# -- LoRA family (LoRA, DoRA, and anything published in PEFT's LoRA format) --------------------------
_LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")  # (on the embedding: lora_embedding_A/B)
_NESTED = ".base_layer"  # PEFT's wrapper of a module around the one it wraps


def load_lora(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    peft_type = read_json(path, PEFT_CONFIG, ref).get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapter(
            f"{ref}: PEFT type {peft_type} is not served on the LoRA path; publish LoRA-format files "
            "(hotswap train exports AdaLoRA that way)"
        )
    config = LoraConfig.from_pretrained(str(path))
    if config.bias != "none" or getattr(config, "lora_bias", False):
        raise UnsupportedAdapter(f"{ref}: LoRA bias={config.bias!r} is not served; use bias='none'")
    tensors = {k.removeprefix(_PEFT_PREFIX): v for k, v in read_tensors(path, ref, base).items()}
    embedding = read_embedding_parts(ref, config, tensors, base)
    modules: set[str] = set()
    expert_keys: dict[str, dict[str, str]] = {}  # experts module -> projection -> its tensors' key prefix
    for key in tensors:
        module, _, part = key.partition(".lora_")
        if not part or f"lora_{part}" not in _LORA_PARTS:
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} (a LoRA artifact holds {', '.join(_LORA_PARTS)})")
        depth, experts = 0, module
        while experts.endswith(_NESTED):  # PEFT nests one wrapper per targeted parameter of a module
            experts, depth = experts.removesuffix(_NESTED), depth + 1
        if experts in base.experts:
            proj = _targeted_parameter(ref, config, experts, base.experts[experts], depth)
            if part != "A.weight" and part != "B.weight":
                raise ArtifactRejected(f"{ref}: tensor {key!r}: {experts}.{proj} takes plain LoRA (lora_A, lora_B)")
            expert_keys.setdefault(experts, {})[proj] = module
            continue
        target_linear(ref, experts, key, base)  # named without PEFT's nesting
        if depth:
            raise ArtifactRejected(f"{ref}: tensor {key!r}: LoRA on several parameters of one linear is not served")
        modules.add(module)
    out = LoadedAdapter(ref=ref, method=method)
    for module in sorted(modules):
        linear = base.linears[module]
        try:
            a = tensors[f"{module}.lora_A.weight"].float()  # (r, in)
            b = tensors[f"{module}.lora_B.weight"].float()  # (out, r)
        except KeyError as e:
            raise ArtifactRejected(f"{ref}: {module} lacks tensor {e.args[0]!r}") from None
        r, scaling = rank_and_scaling(ref, config, module)
        check_shape(ref, f"{module}.lora_A.weight", a, (r, linear.in_features))
        check_shape(ref, f"{module}.lora_B.weight", b, (linear.out_features, r))
        # (r, out) contiguous, scaled and transposed in one pass here in the loader's thread, so that installing
        # on the engine's thread is a plain copy
        b_scaled = torch.mul(b.T, scaling, out=torch.empty(r, linear.out_features))
        dora_scale = None
        magnitude = tensors.get(f"{module}.lora_magnitude_vector")
        if magnitude is not None:
            check_shape(ref, f"{module}.lora_magnitude_vector", magnitude, (linear.out_features,))
            # DoRA (PEFT's DoraLinearLayer): y = W x + (m/n - 1) * W x + (m/n) * s B A x, n = ||W + s B A||
            # per output row, computed once here in fp32; m/n is folded into B.
            weight = dense_weight(linear) + b_scaled.T @ a  # (out, in)
            mag_scale = magnitude.float() / torch.linalg.norm(weight, dim=1)  # (out,)
            if not torch.isfinite(mag_scale).all():
                raise ArtifactRejected(f"{ref}: {module}'s DoRA scale is not finite (a zero-norm weight row)")
            b_scaled = b_scaled * mag_scale[None, :]
            dora_scale = (mag_scale - 1).to(base.dtype)
        out.linear[module] = LinearDelta(
            {LoraKind.name: LoraFactors(a.to(base.dtype), b_scaled.to(base.dtype), dora_scale)}
        )
    for module, delta in embedding.items():  # the head may hold plain LoRA too
        out.linear[module] = LinearDelta({**out.linear[module].parts, **delta.parts}) if module in out.linear else delta
    for experts, projections in sorted(expert_keys.items()):
        factors = {
            proj: _expert_factors(ref, config, tensors, f"{experts}.{proj}", prefix, base.experts[experts], base)
            for proj, prefix in projections.items()
        }
        out.linear[experts] = LinearDelta({ExpertLoraKind.name: ExpertLoraFactors(factors)})
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no LoRA tensors found in {WEIGHTS}")
    return out


def _targeted_parameter(ref: str, config: LoraConfig, module: str, experts: torch.nn.Module, depth: int) -> str:
    """The experts' parameter a tensor nested ``depth`` wrappers deep adapts. PEFT wraps a module once per targeted
    parameter, in the module's registration order (the first one innermost), so the config's
    ``target_parameters`` and the nesting name it."""
    targets = config.target_parameters or []
    names = [
        name
        for name, _ in experts.named_parameters(recurse=False)
        if any(f"{module}.{name}" == t or f"{module}.{name}".endswith(f".{t}") for t in targets)
    ]
    if depth >= len(names):
        raise ArtifactRejected(
            f"{ref}: tensors under {module} nested {depth} deep, but its target_parameters match "
            f"{len(names)} of its parameters ({', '.join(names) or 'none'})"
        )
    name = names[len(names) - 1 - depth]
    if name not in expert_projections(experts):
        raise ArtifactRejected(f"{ref}: {module}.{name} is not an expert projection (LoRA adapts 3-D expert weights)")
    return name


def _expert_factors(
    ref: str,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    param: str,
    prefix: str,
    experts: torch.nn.Module,
    base: BaseInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert projection's (A (E, r, in), B (E, r, out) scaled) from PEFT's stacked factors: lora_A (E*r, in),
    its rows expert by expert, and lora_B (out, r*E), its columns rank component by component (PEFT's
    ``ParamWrapper.get_delta_weight``)."""
    n_in, n_out = expert_projections(experts)[param.rpartition(".")[2]]
    e = experts.num_experts
    try:
        a, b = (tensors[f"{prefix}.lora_{x}.weight"].float() for x in "AB")
    except KeyError as err:
        raise ArtifactRejected(f"{ref}: {param} lacks tensor {err.args[0]!r}") from None
    r, scaling = rank_and_scaling(ref, config, param)
    check_shape(ref, f"{prefix}.lora_A.weight", a, (e * r, n_in))
    check_shape(ref, f"{prefix}.lora_B.weight", b, (n_out, r * e))
    b_experts = b.view(n_out, r, e).permute(2, 1, 0) * scaling  # (E, r, out)
    return a.view(e, r, n_in).to(base.dtype), b_experts.to(base.dtype).contiguous()


@dataclass(frozen=True)
class RandomLoraConfig:
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # scaling numerator: delta = (alpha / r) * B @ A
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)  # module name suffixes to adapt (or all-linear)
    target_parameters: tuple[str, ...] = ()  # parameters to adapt directly (PEFT's target_parameters, or experts)
    use_dora: bool = False  # DoRA: add PEFT's magnitude vector (random around the base column norms)
    seed: int = 0  # fixes A, B (and DoRA magnitudes) for random_lora
    init_std: float = 0.02  # std of the random A and B entries

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArtifact(f"rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise InvalidArtifact("target_modules must name at least one module")


def random_loras(base: PathLike, outs: Mapping[PathLike, int], config: RandomLoraConfig) -> list[Path]:
    """PEFT LoRA (or DoRA) adapters for the base at ``base``: one per (directory, seed), random A and B."""

    def peft_config(model: torch.nn.Module) -> LoraConfig:
        return LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(resolve_targets(model, config.target_modules)),
            target_parameters=list(resolve_parameters(model, config.target_parameters)) or None,
            use_dora=config.use_dora,
            lora_dropout=0.0,
            bias="none",
        )

    def fill(name: str, param: torch.Tensor, initial: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(param.shape, generator=gen)
        if "lora_magnitude_vector" in name:  # around PEFT's init, the base's column norms
            return initial * (1.0 + 0.1 * noise)
        return noise * config.init_std

    return save_variants(base, peft_config, outs, fill)


def random_lora(base: PathLike, out_dir: PathLike, config: RandomLoraConfig) -> Path:
    """One random LoRA/DoRA adapter (seed ``config.seed``)."""
    return random_loras(base, {out_dir: config.seed}, config)[0]
