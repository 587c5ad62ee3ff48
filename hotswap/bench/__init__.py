"""``hotswap bench SCENARIO``: the benchmark scenarios (Markdown table + JSON with the raw figures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hotswap.bench import kv, scaleout, scenarios, soak  # modules: names like `training` and `soak` stay modules here
from hotswap.bench.common import Fixtures, Workload, write_results
from hotswap.errors import InvalidArgument

SCENARIOS: dict[str, Callable[[Fixtures, list[int]], list[dict[str, Any]]]] = {
    "mixed": scenarios.mixed,
    "continuous": scenarios.continuous,
    "swap": scenarios.swap,
    "load": scenarios.load,
    "methods": scenarios.methods,
    "server": scenarios.server,
    "train": scenarios.training,
    "scale-out": scaleout.scale_out,
    "soak": soak.soak,
    "kv": kv.kv,
    "decode": scenarios.decode,
}
DEFAULT_ADAPTERS = {
    "mixed": [1, 4, 16, 32],
    "continuous": [1, 16],
    "swap": [16],
    "load": [16],
    "methods": [16],
    "server": [16],
    "train": [0],
    "scale-out": [1000],
    "soak": [2],  # plain LoRA adapters in the mix
    "kv": [16],  # adapters in the prefix-reuse part
    "decode": [0, 1, 16],
}
DEFAULT_MODELS = {"soak": "tiny"}  # the base preset when --model is not given (else smollm2-135m, W1)


def run(
    scenario: str, workload: Workload, out_dir: Path, cache: Path, adapter_counts: list[int] | None = None
) -> tuple[Path, str]:
    """Run one scenario; returns the JSON path and the Markdown table."""
    if scenario in scaleout.TINY_ONLY and workload.model != "tiny":
        raise InvalidArgument(f"{scenario} measures routing, not FLOPs: run it with --model tiny")
    fixtures = Fixtures(workload, cache)
    rows = SCENARIOS[scenario](fixtures, adapter_counts or DEFAULT_ADAPTERS[scenario])
    return write_results(scenario, replace(workload, dtype=fixtures.dtype), rows, out_dir)  # the dtype it ran in


__all__ = ["DEFAULT_ADAPTERS", "DEFAULT_MODELS", "SCENARIOS", "Workload", "run"]
