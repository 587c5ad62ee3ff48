"""Bottleneck adapters (ours, Houlsby-style): small modules after or beside the sublayers' output linears."""

from __future__ import annotations

from hotswap.methods.bottleneck import kind  # noqa: F401 (registers the bottleneck slot kind)
from hotswap.methods.bottleneck.artifact import load_bottleneck, random_bottlenecks
from hotswap.methods.bottleneck.train import BottleneckOptions, attach_bottleneck
from hotswap.methods.spec import MethodSpec

BOTTLENECK = MethodSpec(
    "bottleneck", "a down/up bottleneck module after (serial) or beside (parallel) a sublayer", load_bottleneck,
    BottleneckOptions, lambda m, o, _: attach_bottleneck(m, o), 1e-2,
    random=lambda base, outs, _: random_bottlenecks(base, outs, bottleneck_dim=16),
)  # fmt: skip

__all__ = ["BOTTLENECK", "BottleneckOptions", "random_bottlenecks"]
