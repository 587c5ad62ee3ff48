"""What every method PEFT trains shares: the LoRA config from our options, attaching with PEFT's errors (e.g.
target modules the base lacks) turned into ours, and the trainable whose export is PEFT's ``save_pretrained``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hotswap.errors import InvalidArgument
from hotswap.methods.common import resolve_targets
from hotswap.methods.trainable import PlainSteps


def lora_config(
    model: torch.nn.Module, rank: int, alpha: float, target_modules: Sequence[str], **extra: Any
) -> LoraConfig:
    """PEFT's LoRA config for ``model`` (``all-linear`` resolved the one way: :func:`resolve_targets`)."""
    targets = list(resolve_targets(model, target_modules))
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", **extra)


def attach(model: torch.nn.Module, config: Any) -> PeftModel:
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise InvalidArgument(f"cannot attach {config.peft_type.value}: {e}") from None


@dataclass
class PeftTrainable(PlainSteps):
    """A PEFT model being trained; its artifact is exactly PEFT's ``save_pretrained`` output."""

    model: PeftModel

    def export(self, out: Path) -> dict[str, float]:
        self.model.save_pretrained(out)
        return {}


def attach_peft(model: torch.nn.Module, config: Any) -> PeftTrainable:
    return PeftTrainable(attach(model, config))


def resume_peft(model: torch.nn.Module, parent: Path) -> PeftTrainable:
    """Continue training a published PEFT artifact."""
    return PeftTrainable(PeftModel.from_pretrained(model, parent, is_trainable=True))
