"""IA³ training: PEFT does the method (``IA3Config``); the artifact is its ``save_pretrained`` output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import IA3Config

from hotswap.errors import InvalidArgument
from hotswap.methods.ia3.artifact import IA3_FEEDFORWARD, IA3_TARGETS
from hotswap.methods.peft_common import PeftTrainable, attach_peft


@dataclass(frozen=True)
class IA3Options:
    target_modules: tuple[str, ...] = field(
        default=IA3_TARGETS, metadata={"help": "linear layers IA3 scales", "flag": "targets"}
    )
    feedforward_modules: tuple[str, ...] = field(
        default=IA3_FEEDFORWARD, metadata={"help": "of those, the ones whose input (not output) is scaled"}
    )

    def __post_init__(self) -> None:
        if not set(self.feedforward_modules) <= set(self.target_modules):
            raise InvalidArgument("feedforward_modules must be among target_modules")


def attach_ia3(model: torch.nn.Module, opts: IA3Options) -> PeftTrainable:
    config = IA3Config(task_type="CAUSAL_LM", target_modules=list(opts.target_modules),
                       feedforward_modules=list(opts.feedforward_modules))  # fmt: skip
    return attach_peft(model, config)
