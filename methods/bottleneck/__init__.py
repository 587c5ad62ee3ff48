"""Bottleneck adapters (ours, Houlsby-style): small modules after or beside the sublayers' output linears."""

from __future__ import annotations

from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.bottleneck import kind  # noqa: F401 (registers the bottleneck slot kind)
from hotswap.methods.bottleneck.artifact import load_bottleneck, random_bottlenecks
from hotswap.methods.bottleneck.train import BottleneckOptions, attach_bottleneck

BOTTLENECK = MethodSpec(
    name="bottleneck",
    summary="a down/up bottleneck module after (serial) or beside (parallel) a sublayer",
    load=load_bottleneck,
    options=BottleneckOptions,
    attach=lambda m, o, _: attach_bottleneck(m, o),
    lr=1e-2,
    random=lambda base, outs, _: random_bottlenecks(base, outs, bottleneck_dim=16),
)

__all__ = ["BOTTLENECK", "BottleneckOptions", "random_bottlenecks"]
