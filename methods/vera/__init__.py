"""VeRA (PEFT): frozen random projections shared by every layer, scaled by two learned vectors per layer; served
per row as a rank-r update in its own slot kind."""

from __future__ import annotations

from hotswap.methods.api.peft_common import resume_peft
from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.vera.artifact import load_vera, random_veras
from hotswap.methods.vera.train import VeraOptions, attach_vera

VERA = MethodSpec(
    name="vera",
    summary="learned vectors scaling random projections shared by every layer (PEFT's VeRA)",
    load=load_vera,
    options=VeraOptions,
    attach=lambda m, o, _: attach_vera(m, o),
    lr=3e-2,
    resume=resume_peft,
    random=lambda base, outs, knobs: random_veras(base, outs, knobs.rank),
    peft_type="VERA",
    peft=True,
    title="VeRA",
)

__all__ = ["VERA", "VeraOptions", "random_veras"]
