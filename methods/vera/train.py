"""VeRA training: PEFT does the method (``VeraConfig``); the artifact is its ``save_pretrained`` output, the shared
projections included."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotswap.errors import InvalidArgument
from hotswap.methods.api.common import DEFAULT_TARGETS, TARGETS_HELP
from hotswap.methods.api.peft_common import PeftTrainable, attach_peft
from hotswap.methods.vera.artifact import vera_config


@dataclass(frozen=True)
class VeraOptions:
    rank: int = field(
        default=64, metadata={"help": "VeRA rank r: the shared random projections' inner size (PEFT's r)"}
    )
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": TARGETS_HELP, "flag": "targets"})
    projection_prng_key: int = field(
        default=0, metadata={"help": "seed of the shared random projections (saved with the adapter)"}
    )
    vera_dropout: float = field(default=0.0, metadata={"help": "dropout on VeRA's input while training"})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of every lambda_d entry (PEFT's d_initial)"})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArgument(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.vera_dropout < 1:
            raise InvalidArgument(f"vera_dropout must be in [0, 1), got {self.vera_dropout}")


def attach_vera(model: torch.nn.Module, opts: VeraOptions) -> PeftTrainable:
    config = vera_config(
        model,
        opts.rank,
        opts.target_modules,
        projection_prng_key=opts.projection_prng_key,
        vera_dropout=opts.vera_dropout,
        d_initial=opts.d_initial,
    )
    return attach_peft(model, config)
