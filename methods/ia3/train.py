"""IA³ training: PEFT does the method (``IA3Config``); the artifact is its ``save_pretrained`` output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotswap.errors import InvalidArgument
from hotswap.methods.api.peft_common import PeftTrainable, attach_peft
from hotswap.methods.ia3.artifact import ia3_config


@dataclass(frozen=True)
class IA3Options:
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "linear layers IA3 scales; unset: PEFT's default for the base's model type (k/v/down_proj on "
            "Llama and Mistral, q/v/down_proj on Qwen and Gemma), else k/v_proj (Phi-3: the fused qkv_proj) and "
            "down_proj",
            "flag": "targets",
        },
    )
    feedforward_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "of those, the ones whose input (not output) is scaled; unset: down_proj if targeted"},
    )

    def __post_init__(self) -> None:
        if self.target_modules and not set(self.feedforward_modules) <= set(self.target_modules):
            raise InvalidArgument("feedforward_modules must be among target_modules")


def attach_ia3(model: torch.nn.Module, opts: IA3Options) -> PeftTrainable:
    return attach_peft(model, ia3_config(model, opts.target_modules, opts.feedforward_modules))
