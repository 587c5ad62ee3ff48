"""IA³ (PEFT): learned vectors scaling keys, values and the feed-forward input; served per row as one
elementwise scale. The worked example of CONTRIBUTING.md: this folder and one registration line."""

from __future__ import annotations

from hotswap.methods.api.peft_common import resume_peft
from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.ia3.artifact import load_ia3, random_ia3s
from hotswap.methods.ia3.train import IA3Options, attach_ia3

IA3 = MethodSpec(
    name="ia3",
    summary="learned scales on keys, values and the feed-forward input (PEFT's IA3)",
    load=load_ia3,
    options=IA3Options,
    attach=lambda m, o, _: attach_ia3(m, o),
    lr=3e-2,
    resume=resume_peft,
    random=lambda base, outs, _: random_ia3s(base, outs),
    peft_type="IA3",
    peft=True,
    sharding=True,
)

__all__ = ["IA3", "IA3Options", "random_ia3s"]
