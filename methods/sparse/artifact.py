"""Sparse weight deltas (hotswap format: Child-tuning, FishMask): ``hotswap_config.json`` {"method"} + per touched
linear ``<module>.weight.indices`` (int64, flat row-major into (out, in)) and ``<module>.weight.values``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from hotswap.errors import ArtifactRejected
from hotswap.formats import HOTSWAP_CONFIG
from hotswap.fsutil import building_dir
from hotswap.methods.api import WEIGHTS, BaseInfo, LinearDelta, LoadedAdapter, read_tensors, target_linear
from hotswap.methods.api.common import DEFAULT_TARGETS, PathLike, base_linears, check_new, target_names


# -- Sparse deltas (hotswap format: Child-tuning, FishMask) ------------------------------------------
def load_sparse(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "fishmask" | "child-tuning"} + ``adapter_model.safetensors`` with
    ``<module>.weight.indices`` (int64, flat row-major into (out, in)) and ``<module>.weight.values``."""
    tensors = read_tensors(path, ref, base, int_keys=(".weight.indices",))
    out = LoadedAdapter(ref=ref, method=method)
    for key in tensors:
        if not key.endswith((".weight.indices", ".weight.values")):
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} in a sparse artifact")
    for key in sorted(tensors):
        if not key.endswith(".weight.indices"):
            continue
        module = key.removesuffix(".weight.indices")
        linear = target_linear(ref, module, key, base)
        idx, val = tensors[key], tensors.get(f"{module}.weight.values")
        if val is None or idx.ndim != 1 or idx.shape != val.shape:
            raise ArtifactRejected(f"{ref}: {module} needs 1-d indices and values of the same length")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= linear.out_features * linear.in_features):
            raise ArtifactRejected(f"{ref}: {key} has indices outside its weight")
        out.linear[module] = LinearDelta({"sparse": (idx, val.to(base.dtype))})
    for key in tensors:
        if key.endswith(".values") and key.removesuffix("values") + "indices" not in tensors:
            raise ArtifactRejected(f"{ref}: tensor {key} has no indices")
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no sparse deltas in {WEIGHTS}")
    return out


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
    paths = check_new(outs)
    linears = base_linears(base, target_modules)
    shapes = {name: module.weight.shape for name, module in linears.items()}
    for out, seed in paths.items():
        gen = torch.Generator().manual_seed(seed)
        deltas = {}
        for name, (rows, cols) in shapes.items():
            nnz = max(1, int(density * rows * cols))
            idx = torch.randperm(rows * cols, generator=gen)[:nnz].sort().values
            deltas[name] = (idx, torch.randn(nnz, generator=gen) * std)
        with building_dir(out) as tmp:
            write_sparse(tmp, deltas, method, target_names(linears))
    return list(paths)


def random_sparse(base: PathLike, out_dir: PathLike, method: str = "fishmask", density: float = 0.005,
                  seed: int = 0, std: float = 0.05) -> Path:  # fmt: skip
    return random_sparses(base, {out_dir: seed}, method, density, std=std)[0]
