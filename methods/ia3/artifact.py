"""IA³ artifacts: PEFT's own files (``adapter_config.json`` with ``peft_type`` IA3, ``target_modules`` and
``feedforward_modules``; ``<module>.ia3_l`` of shape (out, 1), or (1, in) on feed-forward modules)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import IA3Config

from hotswap.errors import ArtifactRejected, UnsupportedAdapter
from hotswap.methods.common import PathLike, save_variants
from hotswap.methods.ia3.kind import IA3Vector
from hotswap.registry import PEFT_CONFIG
from hotswap.serve.adapters import WEIGHTS, BaseInfo, LoadedAdapter, check_shape, read_json, read_tensors, target_linear
from hotswap.serve.layers import LinearDelta

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")  # PEFT's default for Llama-family models
IA3_FEEDFORWARD = ("down_proj",)
_PEFT_PREFIX = "base_model.model."


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
    """PEFT IA³ adapters on keys, values and the feed-forward input, vectors ``1 + N(0, std)``."""
    config = IA3Config(
        task_type="CAUSAL_LM", target_modules=list(IA3_TARGETS), feedforward_modules=list(IA3_FEEDFORWARD)
    )
    return save_variants(base, config, outs, lambda _n, p, _i, gen: 1 + torch.randn(p.shape, generator=gen) * std)
