"""IA³ artifacts: PEFT's own files (``adapter_config.json`` with ``peft_type`` IA3, ``target_modules`` and
``feedforward_modules``; ``<module>.ia3_l`` of shape (out, 1), or (1, in) on feed-forward modules)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import IA3Config
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)

from hotswap.errors import ArtifactRejected, InvalidArgument, UnsupportedAdapter
from hotswap.formats import PEFT_CONFIG
from hotswap.methods.api import (
    WEIGHTS,
    BaseInfo,
    LinearDelta,
    LoadedAdapter,
    check_shape,
    read_json,
    read_tensors,
    target_linear,
)
from hotswap.methods.api.common import ALL_LINEAR, PathLike, resolve_targets, save_variants
from hotswap.methods.ia3.kind import IA3Vector

_PEFT_PREFIX = "base_model.model."
# Where PEFT has no IA3 default for a model type: the same roles as its Llama default, by name. Keys and values
# (or the fused qkv projection, whose output the vector then scales whole) and the feed-forward output projection.
_KEYS_VALUES = (("k_proj", "v_proj"), ("qkv_proj",))
_FEEDFORWARD = ("down_proj",)


def ia3_defaults(model: torch.nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """IA3's default (target, feedforward) modules on ``model``: PEFT's own for its model type
    (``TRANSFORMERS_MODELS_TO_IA3_*_MAPPING``: k/v/down_proj on Llama and Mistral, q/v/down_proj on Qwen and Gemma);
    for a type PEFT does not list (Phi-3, OLMo 2, Granite, the MoE families ...), its Llama default's roles found by
    name."""
    model_type = model.config.model_type
    if model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
        targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        return tuple(targets), tuple(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, ()))
    names = set(resolve_targets(model, (ALL_LINEAR,)))
    keys_values = next((group for group in _KEYS_VALUES if set(group) <= names), ())
    feedforward = tuple(n for n in _FEEDFORWARD if n in names)  # none on an MoE base: its experts are no linears
    if not keys_values:
        raise InvalidArgument(f"no IA3 default for model type {model_type!r}: give target and feedforward modules")
    return (*keys_values, *feedforward), feedforward


def ia3_config(model: torch.nn.Module, targets: tuple[str, ...] = (), feedforward: tuple[str, ...] = ()) -> IA3Config:
    """PEFT's IA3 config for ``model``: unset targets and feedforward modules are :func:`ia3_defaults`; with targets
    given, unset feedforward modules are down_proj if it is targeted."""
    if not targets:
        targets, default_feedforward = ia3_defaults(model)
        feedforward = feedforward or default_feedforward
    elif not feedforward:
        feedforward = tuple(m for m in _FEEDFORWARD if m in targets)
    return IA3Config(task_type="CAUSAL_LM", target_modules=list(targets), feedforward_modules=list(feedforward))


def _matches(patterns: str | list[str] | None, module: str) -> bool:
    """PEFT's rule for ``feedforward_modules``: a regex matched in full, or a list of name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith(f".{p}") for p in patterns or ())


def load_ia3(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    config = read_json(path, PEFT_CONFIG, ref)
    if config.get("peft_type") != "IA3":
        raise UnsupportedAdapter(f"{ref}: PEFT type {config.get('peft_type')} is not IA3")
    feedforward = config.get("feedforward_modules")
    out = LoadedAdapter(ref=ref, method=method)
    for key, t in read_tensors(path, ref, base).items():
        module, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".")
        if part != "ia3_l":
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} (an IA3 artifact holds <module>.ia3_l)")
        linear = target_linear(ref, module, key, base)
        ff = _matches(feedforward, module)
        check_shape(ref, key, t, (1, linear.in_features) if ff else (linear.out_features, 1))
        out.linear[module] = LinearDelta({"ia3": IA3Vector(t.flatten().to(base.dtype), ff)})
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no IA3 vectors found in {WEIGHTS}")
    return out


def random_ia3s(base: PathLike, outs: Mapping[PathLike, int], std: float = 0.2) -> list[Path]:
    """PEFT IA³ adapters on the base's default modules (:func:`ia3_defaults`), vectors ``1 + N(0, std)``."""
    return save_variants(base, ia3_config, outs, lambda _n, p, _i, gen: 1 + torch.randn(p.shape, generator=gen) * std)
