"""Prefix- and prompt-tuning training: PEFT does both; ``VirtualTokenOptions`` is their shared option."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import PrefixTuningConfig

from hotswap.errors import InvalidArgument
from hotswap.methods.peft_common import PeftTrainable, attach_peft


@dataclass(frozen=True)
class VirtualTokenOptions:
    num_virtual_tokens: int = field(
        default=8, metadata={"help": "learned tokens before the prompt", "flag": "virtual-tokens"}
    )

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise InvalidArgument(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


def attach_prefix(model: torch.nn.Module, o: VirtualTokenOptions) -> PeftTrainable:
    return attach_peft(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens))
