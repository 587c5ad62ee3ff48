"""The tensors of a trained adapter artifact, and "the same training up to float summation order"."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def adapter_tensors(artifact: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``artifact``, keyed ``file:tensor``."""
    return {f"{f.name}:{k}": t for f in sorted(artifact.rglob("*.safetensors")) for k, t in load_file(f).items()}


def assert_same_training(got: Path, want: Path) -> None:
    """Two artifacts of one training computed in another summation order (accumulated micro-batches, or
    data-parallel shards all-reduced). Adam divides by sqrt(v): where a weight's gradient is near 0, that order
    shows as a visible part of a step, so the tolerance is a tenth of one step at the smallest default lr (1e-3)."""
    want_t, got_t = adapter_tensors(want), adapter_tensors(got)
    assert want_t.keys() == got_t.keys() and want_t
    for key in want_t:
        torch.testing.assert_close(got_t[key], want_t[key], rtol=1e-4, atol=1e-4, msg=key)
