"""What every method built on PEFT's LoRA layers shares: the config from our options, and attaching
with PEFT's errors (e.g. target modules the base lacks) turned into ours."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hotswap.errors import InvalidArgument


def lora_config(rank: int, alpha: float, target_modules: Sequence[str], **extra: Any) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), task_type="CAUSAL_LM", **extra)


def attach(model: torch.nn.Module, config: Any) -> PeftModel:
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise InvalidArgument(f"cannot attach {config.peft_type.value}: {e}") from None
