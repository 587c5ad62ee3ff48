"""LoRA and DoRA training: PEFT does the method; the artifact is its ``save_pretrained`` output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotswap.errors import InvalidArgument
from hotswap.methods.api.common import DEFAULT_TARGETS, PARAMETERS_HELP, TARGETS_HELP, resolve_parameters
from hotswap.methods.api.peft_common import PeftTrainable, attach_peft, lora_config


@dataclass(frozen=True)
class LoraOptions:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: the update is (alpha / r) B A"})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGETS,
        metadata={
            "help": f"{TARGETS_HELP}; also embed_tokens and lm_head (the input embedding, the output head)",
            "flag": "targets",
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input while training"})
    target_parameters: tuple[str, ...] = field(default=(), metadata={"help": PARAMETERS_HELP})
    trainable_tokens: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "token ids whose embedding rows are trained whole (PEFT's trainable_token_indices; on a tied "
            "output head its rows too), e.g. reserved tokens given a new meaning"
        },
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArgument(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise InvalidArgument(f"dropout must be in [0, 1), got {self.dropout}")
        if len(set(self.trainable_tokens)) != len(self.trainable_tokens) or any(t < 0 for t in self.trainable_tokens):
            raise InvalidArgument(f"trainable_tokens must be distinct token ids, got {list(self.trainable_tokens)}")


def attach_lora(model: torch.nn.Module, opts: LoraOptions, dora: bool) -> PeftTrainable:
    extra: dict[str, list] = {}
    if opts.target_parameters:
        extra["target_parameters"] = list(resolve_parameters(model, opts.target_parameters))
    if opts.trainable_tokens:
        vocab = model.get_input_embeddings().weight.shape[0]
        if past := [t for t in opts.trainable_tokens if t >= vocab]:
            raise InvalidArgument(f"trainable token {past[0]} is outside the base's vocabulary of {vocab}")
        extra["trainable_token_indices"] = list(opts.trainable_tokens)
    return attach_peft(
        model,
        lora_config(
            model, opts.rank, opts.alpha, opts.target_modules, lora_dropout=opts.dropout, use_dora=dora, **extra
        ),
    )
