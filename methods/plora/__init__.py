"""PLoRA (ours, on PEFT's LoRA layers): periodic offload with momentum; the accumulated update as LoRA files."""

from __future__ import annotations

from hotswap.methods.lora.artifact import load_lora
from hotswap.methods.plora.train import PLoraOptions, attach_plora
from hotswap.methods.spec import MethodSpec

PLORA = MethodSpec(
    "plora", "LoRA offloaded into the backbone every K steps: accumulated rank T r", load_lora, PLoraOptions,
    lambda m, o, _: attach_plora(m, o), 5e-3,
)  # fmt: skip

__all__ = ["PLORA", "PLoraOptions"]
