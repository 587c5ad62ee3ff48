"""AdaLoRA (PEFT): rank budget reallocated while training, published as LoRA at the final per-layer ranks."""

from __future__ import annotations

from hotswap.methods.adalora.train import AdaLoraOptions, attach_adalora
from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.lora.artifact import load_lora

ADALORA = MethodSpec(
    name="adalora",
    summary="LoRA whose rank budget moves to the layers that need it (PEFT), exported as LoRA",
    load=load_lora,
    options=AdaLoraOptions,
    attach=lambda m, o, ctx: attach_adalora(m, o, ctx.steps),
    lr=5e-3,
    peft_type="ADALORA",
)

__all__ = ["ADALORA", "AdaLoraOptions"]
