"""BitFit's artifact (hotswap format: PEFT has no bias-only method): ``hotswap_config.json`` {"method": "bitfit"}
+ ``adapter_model.safetensors`` with one ``<module>.bias`` delta per adapted linear."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from hotswap.errors import ArtifactRejected
from hotswap.formats import HOTSWAP_CONFIG
from hotswap.fsutil import building_dir
from hotswap.methods.api import WEIGHTS, BaseInfo, LinearDelta, LoadedAdapter, check_shape, read_tensors, target_linear
from hotswap.methods.api.common import DEFAULT_TARGETS, PathLike, base_linears, check_new, target_names
from hotswap.methods.bitfit.kind import BiasKind


# -- BitFit (hotswap format) ------------------------------------------------------------------------
def load_bitfit(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "bitfit"} + ``adapter_model.safetensors`` with ``<module>.bias``
    tensors holding each bias *delta* (added to the base bias; a layer without bias gets it only in the
    adapter's rows)."""
    out = LoadedAdapter(ref=ref, method=method)
    for key, t in read_tensors(path, ref, base).items():
        if not key.endswith(".bias"):
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} (a BitFit artifact holds <module>.bias)")
        linear = target_linear(ref, key.removesuffix(".bias"), key, base)
        check_shape(ref, key, t, (linear.out_features,))
        out.linear[key.removesuffix(".bias")] = LinearDelta({BiasKind.name: t.to(base.dtype)})
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no bias tensors in {WEIGHTS}")
    return out


def write_bitfit(out: Path, deltas: dict[str, torch.Tensor], target_modules: tuple[str, ...]) -> None:
    """THE BitFit artifact format: ``hotswap_config.json`` + ``adapter_model.safetensors`` holding one
    ``<module>.bias`` delta per adapted linear (added to the base's bias; layers without one gain it)."""
    config = {"method": "bitfit", "target_modules": sorted(target_modules), "format": "bias deltas"}
    save_file(deltas, out / "adapter_model.safetensors")
    (out / HOTSWAP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def random_bitfits(
    base: PathLike, outs: Mapping[PathLike, int], target_modules: tuple[str, ...] = DEFAULT_TARGETS, std: float = 0.02
) -> list[Path]:
    """hotswap BitFit artifacts: ``hotswap_config.json`` + ``<module>.bias`` deltas for matching linears."""
    paths = check_new(outs)
    linears = base_linears(base, target_modules)
    for out, seed in paths.items():
        gen = torch.Generator().manual_seed(seed)
        tensors = {f"{name}.bias": torch.randn(m.out_features, generator=gen) * std for name, m in linears.items()}
        with building_dir(out) as tmp:
            write_bitfit(tmp, tensors, target_names(linears))
    return list(paths)


def random_bitfit(
    base: PathLike,
    out_dir: PathLike,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    return random_bitfits(base, {out_dir: seed}, target_modules, std)[0]
