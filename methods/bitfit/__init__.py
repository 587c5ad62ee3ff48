"""BitFit: bias deltas on the target linears (hotswap format), served as per-row biases."""

from __future__ import annotations

from hotswap.methods.bitfit.artifact import load_bitfit, random_bitfit, random_bitfits
from hotswap.methods.bitfit.train import BitFitOptions, attach_bitfit, resume_bitfit
from hotswap.methods.spec import MethodSpec

BITFIT = MethodSpec(
    "bitfit", "bias-only: a bias delta per target linear", load_bitfit, BitFitOptions,
    lambda m, o, _: attach_bitfit(m, o), 5e-2, resume_bitfit, random=lambda base, outs, _: random_bitfits(base, outs),
)  # fmt: skip

__all__ = ["BITFIT", "BitFitOptions", "random_bitfit", "random_bitfits"]
