"""DyLoRA (ours, on PEFT's LoRA layers): nested ranks, served at any rank a request asks for."""

from __future__ import annotations

from hotswap.methods.dylora.train import DyLoraOptions, attach_dylora
from hotswap.methods.lora.artifact import load_lora
from hotswap.methods.spec import MethodSpec

DYLORA = MethodSpec(
    "dylora", "LoRA trained at nested ranks: a request may ask for any rank <= r", load_lora, DyLoraOptions,
    lambda m, o, _: attach_dylora(m, o), 5e-3, ranked=True, title="DyLoRA",
)  # fmt: skip

__all__ = ["DYLORA", "DyLoraOptions"]
