"""DyLoRA: LoRA trained with nested ranks, so every truncation b <= r works at serving time.

Each step samples b uniformly in [1, r]; every adapted layer uses only the first b rows of A and
columns of B, with scale alpha / b (the paper's W0 x + (alpha/b) B[:, :b] A[:b] x). All of the first
b components train (not only the b-th). PEFT has no DyLoRA, so this is ours, on PEFT's LoRA layers:
a forward hook on each ``lora_A`` masks the components >= b and a pre-hook sets the scaling to
alpha/b; in eval mode both step aside and the adapter runs at its full rank r.

The rank is drawn at the start of each optimizer step (a ``TrainerCallback``), so the micro-batches of one step
share it.

Published as PEFT LoRA files at the maximum rank r (alpha unchanged); the engine serves a request at
rank b by truncating the same way (``Request.rank``; ``hotswap.methods.lora.ops.rank_truncation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback, TrainerControl, TrainerState

from hotswap.errors import InvalidArgument
from hotswap.methods.api.common import DEFAULT_TARGETS, TARGETS_HELP
from hotswap.methods.api.peft_common import attach, lora_config
from hotswap.methods.api.trainable import PlainSteps


@dataclass(frozen=True)
class DyLoraOptions:
    rank: int = field(default=8, metadata={"help": "the maximum rank r (any lower one serves)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: alpha / b at rank b"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": TARGETS_HELP, "flag": "targets"})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArgument(f"rank must be >= 1, got {self.rank}")


@dataclass
class DyLoraTrainable(PlainSteps):
    model: PeftModel
    options: DyLoraOptions
    rank: int = 0  # b, the rank of the current training step (set at each step's start)

    def __post_init__(self) -> None:
        r, alpha = self.options.rank, self.options.alpha
        positions = torch.arange(r)
        self.rank = r

        def truncate(module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
            return out * (positions < self.rank).to(out.device, out.dtype) if module.training else out

        def rescale(layer: torch.nn.Module, _inputs: object) -> None:
            layer.scaling["default"] = alpha / (self.rank if layer.training else r)  # eval: the full adapter

        for layer in self._layers():
            layer.lora_A["default"].register_forward_hook(truncate)
            layer.register_forward_pre_hook(rescale)

    def _layers(self) -> list[LoraLayer]:
        return [m for m in self.model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]

    def sample_rank(self) -> None:
        """This step's rank b in [1, r], from torch's generator (seeded by the run, restored with a checkpoint,
        the same in every data-parallel process), once per optimizer step: every micro-batch of a step uses it."""
        self.rank = int(torch.randint(1, self.options.rank + 1, ()).item())

    def callbacks(self) -> list[TrainerCallback]:
        return [_SampleRank(self)]

    def export(self, out: Path) -> dict[str, float]:
        self.model.save_pretrained(out)  # all r components; alpha as configured
        return {}


class _SampleRank(TrainerCallback):
    def __init__(self, trainable: DyLoraTrainable) -> None:
        self.trainable = trainable

    def on_step_begin(self, args: object, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        self.trainable.sample_rank()


def attach_dylora(model: torch.nn.Module, opts: DyLoraOptions) -> DyLoraTrainable:
    return DyLoraTrainable(attach(model, lora_config(model, opts.rank, opts.alpha, opts.target_modules)), opts)
