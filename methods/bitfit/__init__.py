"""BitFit: bias deltas on the target linears (hotswap format), served as per-row biases."""

from __future__ import annotations

from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.bitfit.artifact import load_bitfit, random_bitfit, random_bitfits
from hotswap.methods.bitfit.train import BitFitOptions, attach_bitfit, resume_bitfit

BITFIT = MethodSpec(
    name="bitfit",
    summary="bias-only: a bias delta per target linear",
    load=load_bitfit,
    options=BitFitOptions,
    attach=lambda m, o, _: attach_bitfit(m, o),
    lr=5e-2,
    resume=resume_bitfit,
    random=lambda base, outs, _: random_bitfits(base, outs),
)

__all__ = ["BITFIT", "BitFitOptions", "random_bitfit", "random_bitfits"]
