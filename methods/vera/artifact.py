"""VeRA artifacts: PEFT's own files (``adapter_config.json`` with ``peft_type`` VERA and rank ``r``; in the weights
the shared projections ``base_model.vera_A`` (r, largest in) and ``base_model.vera_B`` (largest out, r), and per
adapted module ``<module>.vera_lambda_b`` (out,) and ``<module>.vera_lambda_d`` (r,))."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import VeraConfig

from hotswap.errors import ArtifactRejected, UnsupportedAdapter
from hotswap.formats import PEFT_CONFIG
from hotswap.methods.api import (
    WEIGHTS,
    BaseInfo,
    LinearDelta,
    LoadedAdapter,
    check_finite,
    check_shape,
    read_json,
    read_tensors,
    target_linear,
)
from hotswap.methods.api.common import DEFAULT_TARGETS, PathLike, gaussian, resolve_targets, save_variants
from hotswap.methods.vera.kind import VeraFactors, VeraKind

_PEFT_PREFIX = "base_model.model."
_SHARED_A, _SHARED_B = "base_model.vera_A", "base_model.vera_B"
_LAMBDAS = ("vera_lambda_b", "vera_lambda_d")


def vera_config(
    model: torch.nn.Module,
    rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    **extra: float | int,
) -> VeraConfig:
    """PEFT's VeRA config for ``model`` (``all-linear`` resolved the one way: :func:`resolve_targets`); the
    projections are saved with the adapter, so it serves without regenerating them."""
    targets = list(resolve_targets(model, target_modules))
    return VeraConfig(r=rank, target_modules=targets, save_projection=True, task_type="CAUSAL_LM", **extra)


def load_vera(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    config = read_json(path, PEFT_CONFIG, ref)
    if config.get("peft_type") != "VERA":
        raise UnsupportedAdapter(f"{ref}: PEFT type {config.get('peft_type')} is not VERA")
    if config.get("save_projection") is False:
        raise UnsupportedAdapter(f"{ref}: VeRA without its saved projections is not served; save with save_projection")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter(f"{ref}: VeRA bias={config.get('bias')!r} is not served; use bias='none'")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ArtifactRejected(f"{ref}: r in {PEFT_CONFIG} must be a positive integer, got {r!r}")
    tensors = read_tensors(path, ref, base)
    shared = {}
    for key in (_SHARED_A, _SHARED_B):
        if key not in tensors:
            raise ArtifactRejected(f"{ref}: {WEIGHTS} lacks tensor {key!r} (the shared projection)")
        shared[key] = tensors.pop(key)
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".")
        if not key.startswith(_PEFT_PREFIX) or part not in _LAMBDAS:
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} (a VeRA artifact holds <module>.vera_lambda_b/d)")
        target_linear(ref, module, key, base)
        vectors.setdefault(module, {})[part] = t
    if not vectors:
        raise ArtifactRejected(f"{ref}: no VeRA vectors found in {WEIGHTS}")
    linears = {module: base.linears[module] for module in vectors}
    _check_projection(ref, _SHARED_A, shared[_SHARED_A], r, max(m.in_features for m in linears.values()), 0)
    _check_projection(ref, _SHARED_B, shared[_SHARED_B], r, max(m.out_features for m in linears.values()), 1)
    out = LoadedAdapter(ref=ref, method=method)
    for module, linear in sorted(linears.items()):
        keys = {part: f"{_PEFT_PREFIX}{module}.{part}" for part in _LAMBDAS}
        if missing := [key for part, key in keys.items() if part not in vectors[module]]:
            raise ArtifactRejected(f"{ref}: {WEIGHTS} lacks tensor {missing[0]!r}")
        lambda_b, lambda_d = vectors[module]["vera_lambda_b"], vectors[module]["vera_lambda_d"]
        check_shape(ref, keys["vera_lambda_b"], lambda_b, (linear.out_features,))
        check_shape(ref, keys["vera_lambda_d"], lambda_d, (r,))
        factors = VeraFactors.fold(shared[_SHARED_A], shared[_SHARED_B], lambda_d, lambda_b, linear, base.dtype)
        for t in (factors.A, factors.B):  # the products of finite vectors may still overflow the serving dtype
            check_finite(ref, f"{module}'s VeRA update", t, base.dtype)
        out.linear[module] = LinearDelta({VeraKind.name: factors})
    return out


def _check_projection(ref: str, key: str, t: torch.Tensor, r: int, size: int, rank_dim: int) -> None:
    """A shared projection holds rank ``r`` on ``rank_dim`` and at least ``size`` (the largest adapted layer's) on
    the other dimension: PEFT slices it to each layer."""
    if t.ndim != 2 or t.shape[rank_dim] != r or t.shape[1 - rank_dim] < size:
        need = f"({r}, >= {size})" if rank_dim == 0 else f"(>= {size}, {r})"
        raise ArtifactRejected(f"{ref}: tensor {key} has shape {tuple(t.shape)}, this base needs {need}")


def random_veras(base: PathLike, outs: Mapping[PathLike, int], rank: int = 16, std: float = 0.3) -> list[Path]:
    """PEFT VeRA adapters of rank ``rank`` on every decoder linear of the base, their vectors ``N(0, std)``."""
    return save_variants(base, lambda model: vera_config(model, rank), outs, gaussian(std))
