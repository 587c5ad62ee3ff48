"""DyLoRA (ours, on PEFT's LoRA layers): nested ranks, served at any rank a request asks for."""

from __future__ import annotations

from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.dylora.train import DyLoraOptions, attach_dylora
from hotswap.methods.lora.artifact import load_lora

DYLORA = MethodSpec(
    name="dylora",
    summary="LoRA trained at nested ranks: a request may ask for any rank <= r",
    load=load_lora,
    options=DyLoraOptions,
    attach=lambda m, o, _: attach_dylora(m, o),
    lr=5e-3,
    ranked=True,
    title="DyLoRA",
)

__all__ = ["DYLORA", "DyLoraOptions"]
