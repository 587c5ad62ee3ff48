"""``TrainConfig``: what a training run does, validated once; the lineage records it whole.

Names follow transformers' ``TrainingArguments`` where one exists (``gradient_accumulation_steps``, ``warmup_ratio``,
``weight_decay``, ``max_grad_norm``, ``bf16``, ``fp16``, ``eval_steps``, ``save_steps``, ``report_to``,
``deepspeed``, ``fsdp``); ``hotswap.train.hf`` maps it onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hotswap.devices import DTYPE_CHOICES
from hotswap.errors import InvalidArgument
from hotswap.train.methods import method_options, trainable_methods

# our scheduler name -> transformers' (without warmup, with warmup): the rate after the warmup
SCHEDULERS = {
    "linear": ("linear", "linear"),  # down to 0 at the last step
    "cosine": ("cosine", "cosine"),  # half a cosine down to 0
    "constant": ("constant", "constant_with_warmup"),
}


@dataclass(frozen=True)
class TrainConfig:
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (e.g. rank, alpha)
    steps: int | None = None  # optimizer steps; default 200 unless epochs is given
    epochs: float | None = None  # passes over the training data (instead of steps)
    lr: float | None = None  # peak learning rate; default: the method's (the method's spec)
    batch_size: int = 16  # examples per micro-batch in each process (Trainer's per_device_train_batch_size)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step: effective batch = batch x this x processes
    lr_scheduler: str = "linear"  # the rate after the warmup: linear | cosine (down to 0 at the end) | constant
    warmup_ratio: float = 0.0  # share of the steps over which the rate rises linearly from 0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (never on biases and norms)
    max_grad_norm: float = 1.0  # clip the gradients' global norm to this (0: no clipping)
    bf16: bool = False  # mixed precision: compute in bfloat16 (autocast); weights stay as loaded
    fp16: bool = False  # mixed precision: compute in float16 with loss scaling (CUDA)
    seed: int = 0
    eval_steps: int = 50  # steps between evaluations (and at the start and the end)
    save_steps: int | None = None  # checkpoint every N steps into the run directory (what a resume continues from)
    report_to: tuple[str, ...] = ()  # Trainer's integrations (tensorboard, wandb, mlflow, ...); () reports nowhere
    data_size: int = 512  # examples drawn from a built-in task
    device: str = "cpu"  # cpu | cuda (under a launcher: each process's own GPU)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about 1/3 more time
    dtype: str = "auto"  # the base's while training (auto: hotswap.devices.resolve_dtype); adapters train in fp32
    deepspeed: str | None = None  # a DeepSpeed config (JSON file), passed to Trainer; methods with `sharding` only
    fsdp: str = ""  # FSDP options passed to Trainer (e.g. "full_shard auto_wrap"); methods with `sharding` only

    def __post_init__(self) -> None:
        method_options(self.method, self.options)  # unknown method / foreign options fail here
        if self.steps is not None and self.epochs is not None:
            raise InvalidArgument("give steps or epochs, not both")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "eval_steps", "save_steps", "data_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value}")
        for name in ("epochs", "lr", "warmup_ratio", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidArgument(f"{name} must be a finite number, got {value}")
        if self.epochs is not None and self.epochs <= 0:
            raise InvalidArgument(f"epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if self.lr_scheduler not in SCHEDULERS:
            raise InvalidArgument(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidArgument(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise InvalidArgument(
                f"weight_decay and max_grad_norm must be >= 0, got {self.weight_decay} and {self.max_grad_norm}"
            )
        if self.bf16 and self.fp16:
            raise InvalidArgument("bf16 and fp16 are two mixed precisions: choose one")
        if self.dtype not in DTYPE_CHOICES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if "none" in self.report_to:
            raise InvalidArgument("report_to: leave it empty to report nowhere")
        self._check_method()

    def _check_method(self) -> None:
        """What the method cannot train with, refused before anything loads."""
        spec = trainable_methods()[self.method]
        if self.gradient_checkpointing and not spec.checkpointing:
            raise InvalidArgument(
                f"{self.method} cannot train with gradient checkpointing (its virtual tokens reach the layers "
                "through the KV cache, which checkpointed layers drop)"
            )
        if self.weight_decay and not spec.weight_decay:
            raise InvalidArgument(
                f"{self.method} trains a masked part of the base's own weights, and weight decay would move every "
                "other one: train it with weight_decay 0"
            )
        if self.deepspeed and self.fsdp:
            raise InvalidArgument("deepspeed and fsdp are two ways to shard: choose one")
        if (self.deepspeed or self.fsdp) and not spec.sharding:
            sharded = ", ".join(name for name, s in trainable_methods().items() if s.sharding)
            raise InvalidArgument(
                f"{self.method} keeps training state of its own that DeepSpeed / FSDP would not shard or checkpoint "
                f"(they train {sharded}): train it with data parallelism (torchrun) instead"
            )

    @property
    def mixed_precision(self) -> str:
        """What the forward and backward compute in: bf16, fp16, or no (the weights' own dtypes)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    def scheduler(self) -> str:
        """transformers' ``lr_scheduler_type`` for this run."""
        plain, warm = SCHEDULERS[self.lr_scheduler]
        return warm if self.warmup_ratio else plain
