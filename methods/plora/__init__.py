"""PLoRA (ours, on PEFT's LoRA layers): periodic offload with momentum; the accumulated update as LoRA files."""

from __future__ import annotations

from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.lora.artifact import load_lora
from hotswap.methods.plora.train import PLoraOptions, attach_plora

PLORA = MethodSpec(
    name="plora",
    summary="LoRA offloaded into the backbone every K steps: accumulated rank T r",
    load=load_lora,
    options=PLoraOptions,
    attach=lambda m, o, _: attach_plora(m, o),
    lr=5e-3,
)

__all__ = ["PLORA", "PLoraOptions"]
