"""AdaLoRA (PEFT): rank budget reallocated while training, published as LoRA at the final per-layer ranks."""

from __future__ import annotations

from hotswap.methods.adalora.train import AdaLoraOptions, attach_adalora
from hotswap.methods.lora.artifact import load_lora
from hotswap.methods.spec import MethodSpec

ADALORA = MethodSpec(
    "adalora", "LoRA whose rank budget moves to the layers that need it (PEFT), exported as LoRA", load_lora,
    AdaLoraOptions, lambda m, o, ctx: attach_adalora(m, o, ctx.steps), 5e-3,
)  # fmt: skip

__all__ = ["ADALORA", "AdaLoraOptions"]
