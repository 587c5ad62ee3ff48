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
from hotswap.quantization import QUANTIZE_CHOICES, check_quantize
from hotswap.train.methods import method_options, trainable_methods

# our scheduler name -> transformers' (without warmup, with warmup): the rate after the warmup
SCHEDULERS = {
    "linear": ("linear", "linear"),  # down to 0 at the last step
    "cosine": ("cosine", "cosine"),  # half a cosine down to 0
    "constant": ("constant", "constant_with_warmup"),
}

# the fields that count something: each at least 1 (None: unset, where the field allows it)
POSITIVE_INTS = ("steps", "batch_size", "gradient_accumulation_steps", "eval_steps", "save_steps", "data_size")


@dataclass(frozen=True)
class TrainConfig:
    """Training run settings (TrainConfig; the lineage records them whole).

    Each field's ``metadata`` makes it a ``hotswap train`` flag (:func:`hotswap.cli.common.add_setting_flags`, by
    field name, as :mod:`hotswap.settings` reads it): its ``help``, and where needed ``choices``; ``setting:
    False`` where the flag is not generated from the field alone (``method``, ``options``, ``report_to``).
    """

    method: str = field(metadata={"help": "the method to train", "setting": False})  # choices: the trainable methods
    options: dict[str, Any] = field(  # the method's options (e.g. rank, alpha): one flag per options field
        default_factory=dict,
        metadata={"help": "method options (each method takes its own; defaults per method)", "setting": False},
    )
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default 200, unless epochs is given)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training data, instead of steps"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's)"})
    batch_size: int = field(  # Trainer's per_device_train_batch_size
        default=16, metadata={"help": "examples per micro-batch in each process"}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "micro-batches per optimizer step: effective batch = batch size x this x processes"},
    )
    lr_scheduler: str = field(
        default="linear",
        metadata={
            "help": "the learning rate after the warmup: linear or cosine decay to 0, or constant",
            "choices": tuple(SCHEDULERS),
        },
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "share of the steps over which the rate rises linearly from 0"}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW's decoupled weight decay (never on biases and norms)"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the gradients' global norm to this (0: no clipping)"}
    )
    bf16: bool = field(  # autocast
        default=False, metadata={"help": "mixed precision: compute in bfloat16 (CPU or GPU); weights stay as loaded"}
    )
    fp16: bool = field(default=False, metadata={"help": "mixed precision: compute in float16 with loss scaling (CUDA)"})
    seed: int = field(default=0, metadata={"help": "the run's seed: initialization, data order, built-in task draws"})
    eval_steps: int = field(default=50, metadata={"help": "steps between evaluations (also at the start and the end)"})
    save_steps: int | None = field(
        default=None, metadata={"help": "checkpoint into the run directory every N steps (what --resume continues)"}
    )
    report_to: tuple[str, ...] = field(  # () reports nowhere
        default=(),
        metadata={
            "help": "comma-separated Trainer integrations: tensorboard (pip install 'hotswap[tensorboard]'), wandb, "
            "mlflow, ...; none (default)",
            "setting": False,
        },
    )
    data_size: int = field(default=512, metadata={"help": "examples drawn from a built-in task"})
    device: str = field(
        default="cpu", metadata={"help": "cpu, cuda or auto (under a launcher: each process's own GPU)"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward: less memory, about 1/3 more time"}
    )
    dtype: str = field(  # auto: hotswap.devices.resolve_dtype
        default="auto",
        metadata={
            "help": "the base's weights while training: auto = the checkpoint's dtype (float32 on a CPU without "
            "native bfloat16); adapter weights train and are published in float32",
            "choices": DTYPE_CHOICES,
        },
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": "train over the base quantized at load (nf4: QLoRA), PEFT's methods only; the adapter is "
            "published for that quantized base",
            "choices": QUANTIZE_CHOICES,
        },
    )
    deepspeed: str | None = field(  # methods with `sharding` only
        default=None, metadata={"help": "DeepSpeed config (JSON file), passed to Trainer (PEFT's methods only)"}
    )
    fsdp: str = field(  # methods with `sharding` only
        default="",
        metadata={"help": "FSDP options passed to Trainer, e.g. 'full_shard auto_wrap' (PEFT's methods only)"},
    )

    @property
    def quantized(self) -> str | None:
        """The quantization of the base (None: float)."""
        return check_quantize(self.quantize)

    def __post_init__(self) -> None:
        method_options(self.method, self.options)  # unknown method / foreign options fail here
        check_quantize(self.quantize)
        if self.steps is not None and self.epochs is not None:
            raise InvalidArgument("give steps or epochs, not both")
        for name in POSITIVE_INTS:
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
