"""Bottleneck adapters' artifact (hotswap format): ``hotswap_config.json`` {"method": "bottleneck", "activation",
"placement"} + per adapted linear ``<module>.adapter_down.{weight,bias}`` and ``<module>.adapter_up.{weight,bias}``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from hotswap.errors import ArtifactRejected, UnsupportedAdapter
from hotswap.formats import HOTSWAP_CONFIG
from hotswap.fsutil import building_dir
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
from hotswap.methods.api.common import PathLike, base_linears, check_new
from hotswap.methods.bottleneck.ops import ACTIVATIONS, Bottleneck

BOTTLENECK_TARGETS = ("o_proj", "down_proj")  # the attention and feed-forward sublayers' outputs

# -- Bottleneck adapters (hotswap format) -------------------------------------------------------------
_BOTTLENECK_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def load_bottleneck(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "bottleneck", "activation", "placement"} + per adapted linear
    ``<module>.adapter_down.{weight,bias}`` and ``<module>.adapter_up.{weight,bias}``."""
    config = read_json(path, HOTSWAP_CONFIG, ref)
    activation, placement = config.get("activation", "relu"), config.get("placement", "serial")
    if activation not in ACTIVATIONS or placement not in ("serial", "parallel"):
        raise UnsupportedAdapter(f"{ref}: activation {activation!r} / placement {placement!r} not served")
    tensors = read_tensors(path, ref, base)
    modules = set()
    for key in tensors:
        module, _, part = key.partition(".adapter_")
        if part not in _BOTTLENECK_PARTS:
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} in a bottleneck artifact")
        target_linear(ref, module, key, base)
        modules.add(module)
    out = LoadedAdapter(ref=ref, method=method)
    for module in sorted(modules):
        try:
            down, down_b, up, up_b = (tensors[f"{module}.adapter_{p}"] for p in _BOTTLENECK_PARTS)
        except KeyError as e:
            raise ArtifactRejected(f"{ref}: {module} lacks tensor {e.args[0]!r}") from None
        linear = base.linears[module]
        d = linear.out_features if placement == "serial" else linear.in_features
        m = down.shape[0]
        check_shape(ref, f"{module}.adapter_down.weight", down, (m, d))
        check_shape(ref, f"{module}.adapter_down.bias", down_b, (m,))
        check_shape(ref, f"{module}.adapter_up.weight", up, (linear.out_features, m))
        check_shape(ref, f"{module}.adapter_up.bias", up_b, (linear.out_features,))
        bn = Bottleneck(down, down_b, up, up_b, activation=activation, serial=placement == "serial")
        out.linear[module] = LinearDelta({"bottleneck": bn})
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no bottleneck modules in {WEIGHTS}")
    return out


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
    paths = check_new(outs)
    layers = base_linears(base, BOTTLENECK_TARGETS)
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
