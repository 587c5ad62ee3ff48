"""transformers' ``Trainer`` running our objective: :class:`HotswapTrainer` and the ``TrainingArguments`` of a run.

The subclass changes what Trainer cannot know and nothing else:

- ``compute_loss``: the cross-entropy of the scored tokens (``hotswap.train.loss``), summed and divided by the
  scored tokens of the whole optimizer step, counted over every micro-batch and every process
  (``get_batch_samples``), so that k micro-batches of b examples, or N processes of b/N, give the gradient of
  one batch of k·b; plus the method's penalty (AdaLoRA), once per optimizer step.
- ``evaluate``: eval loss and exact-match accuracy (what the metrics and the curve record), each process
  evaluating its share of the eval examples and the sums added up.
- ``log``: the method's penalty logged beside the loss, not in it (the curve is the task loss).
- checkpoints (``save_model``, ``_load_from_checkpoint``) hold the trainable parameters and the method's state
  (``hotswap.train.checkpoints``); under DeepSpeed / FSDP, Trainer's own (PEFT's methods only).

Everything else (optimizer, schedule, clipping, mixed precision, accumulation, data parallelism, checkpoint
rotation, RNG state, reporting) is Trainer's, configured by :func:`training_arguments`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hotswap.errors import InvalidArgument
from hotswap.methods.api.trainable import Trainable
from hotswap.train import checkpoints
from hotswap.train.config import TrainConfig
from hotswap.train.curve import Point
from hotswap.train.data import Example
from hotswap.train.loss import IGNORE, collate, eval_sums, means, token_losses

log = logging.getLogger(__name__)
_STATE = "trainer_state.json"  # Trainer's state in a checkpoint


class Examples(torch.utils.data.Dataset):
    """Examples as Trainer's dataset (``hotswap.train.loss.collate`` batches them)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class HotswapTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss divides by the scored tokens of the whole optimizer step

    def __init__(self, *, trainable: Trainable, eval_examples: Sequence[Example], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_accepts_loss_kwargs = True  # the same for transformers without `loss_is_scaled_for_ga`
        self.trainable = trainable
        self.eval_examples = eval_examples
        self._penalty = 0.0  # the penalty's part of the losses since the last log

    @property
    def sharded(self) -> bool:
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def get_batch_samples(
        self, epoch_iterator: Iterator[dict[str, torch.Tensor]], num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """The next optimizer step's micro-batches, and the scored tokens in them across all processes."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        scored = sum(
            ((b["labels"] != IGNORE).sum().to(device) for b in batches),
            torch.zeros((), dtype=torch.long, device=device),
        )
        return batches, self.accelerator.reduce(scored, reduction="sum")

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        losses = token_losses(model, inputs)  # (n_scored,)
        scored = num_items_in_batch if num_items_in_batch is not None else max(losses.numel(), 1)
        # data-parallel gradients are averaged over the processes, so each process's share is scaled back up
        loss = losses.sum() / scored * self.accelerator.num_processes
        penalty = self.trainable.penalty()
        if penalty is not None:
            share = penalty / self.current_gradient_accumulation_steps
            self._penalty += share.item()
            loss = loss + share
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._penalty:
            logs = {**logs, "loss": logs["loss"] - self._penalty, "penalty": self._penalty}
            self._penalty = 0.0
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Eval loss and accuracy over the eval examples: a share per process, sums added up. Sharded models
        (DeepSpeed / FSDP) gather their weights in every forward, so there each process runs all of them."""
        model, share = self.model, self.eval_examples
        if self.sharded:
            model = self.model_wrapped
        else:
            share = share[self.args.process_index :: self.args.world_size]
        sums = eval_sums(model, share, self.args.per_device_eval_batch_size, self.args.device)
        if not self.sharded:
            sums = self.accelerator.reduce(sums, reduction="sum")
        loss, accuracy = means(sums)
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_accuracy": accuracy}
        log.info("step %d/%d: eval loss %.4f, eval accuracy %.3f", self.state.global_step, self.state.max_steps,
                 loss, accuracy)  # fmt: skip
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.sharded or not _internal_call:
            super().save_model(output_dir, _internal_call)
        elif self.args.should_save:
            checkpoints.save(Path(output_dir or self.args.output_dir), self.model, self.trainable)

    def train_from(self, checkpoint: Path | None) -> None:
        """``train``, resuming from ``checkpoint`` if given. A checkpoint of the last step is only loaded: Trainer
        would resume it into the middle of its epoch and take one step more."""
        state = TrainerState.load_from_json(str(checkpoint / _STATE)) if checkpoint else None
        if state is not None and state.global_step >= self.args.max_steps:
            self._load_from_checkpoint(str(checkpoint))
            self.state = state
        else:
            self.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.sharded:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            checkpoints.load(Path(resume_from_checkpoint), model or self.model, self.trainable)


class Progress(TrainerCallback):
    """The progress bar of the first process: steps, the last train loss and eval loss."""

    def __init__(self, desc: str, show: bool) -> None:
        self.desc, self.show = desc, show
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args: object, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        show = self.show and state.is_world_process_zero and sys.stderr.isatty()
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, disable=not show, unit="step")

    def on_log(
        self, args: object, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kw: object
    ) -> None:
        for key, shown in (("loss", "loss"), ("eval_loss", "eval")):
            if logs and key in logs:
                self.postfix[shown] = f"{logs[key]:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def on_step_end(self, args: object, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_train_end(self, args: object, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        if self.bar is not None:
            self.bar.close()


def check_reporting(names: Sequence[str]) -> None:
    """Each of ``names`` is an integration Trainer knows and whose package is installed, or a one-line refusal."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    installed = get_available_reporting_integrations()
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise InvalidArgument(
                f"report_to: unknown integration {name!r} (Trainer's: {', '.join(INTEGRATION_TO_CALLBACK)})"
            )
        if name not in installed:
            extra = " (pip install 'hotswap[tensorboard]')" if name == "tensorboard" else ""
            raise InvalidArgument(f"report_to {name}: its package is not installed{extra}")


def training_arguments(
    config: TrainConfig, run_dir: Path, lr: float, device: str, resume: bool, evaluate: bool = True
) -> TrainingArguments:
    """Trainer's arguments for ``config`` (``max_steps`` is set once the data and the world size are known);
    ``evaluate`` False: no evaluation at all (the benchmark's steps)."""
    check_reporting(config.report_to)
    cpu = device == "cpu"
    try:
        return TrainingArguments(
            output_dir=str(run_dir),  # checkpoint-N folders, and reporters' logs (tensorboard: runs/)
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=lr,
            lr_scheduler_type=config.scheduler(),
            warmup_steps=float(config.warmup_ratio),  # a float in [0, 1): a share of the steps
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            bf16=config.bf16,
            fp16=config.fp16,
            seed=config.seed,
            data_seed=config.seed,
            logging_strategy="steps",
            logging_steps=1,  # every step's loss: the curve
            eval_strategy="steps" if evaluate else "no",
            eval_steps=config.eval_steps,
            eval_on_start=evaluate and not resume,  # the untrained model's figures (a resumed run has them already)
            save_strategy="steps" if config.save_steps else "no",
            save_steps=config.save_steps or 1,
            save_total_limit=2,  # the last checkpoint, and the one before while the last is written
            report_to=list(config.report_to) or "none",
            disable_tqdm=True,  # our own bar (Progress); Trainer's would print every step's logs
            use_cpu=cpu,
            dataloader_pin_memory=not cpu,
            remove_unused_columns=False,
            label_names=["labels"],
            ddp_find_unused_parameters=False,  # every trainable parameter takes part in every step
            deepspeed=config.deepspeed,
            fsdp=config.fsdp or None,
            # QLoRA's paged optimizer (optimizer state paged out of GPU memory under pressure) where bitsandbytes
            # pages: on CUDA
            **({"optim": "paged_adamw_32bit"} if config.quantized and device.startswith("cuda") else {}),
        )
    except (ValueError, ImportError, RuntimeError) as e:  # e.g. bf16 on a GPU without it, DeepSpeed not installed
        raise InvalidArgument(f"cannot train with these settings: {e}") from None


def make_trainer(
    trainable: Trainable,
    args: TrainingArguments,
    train_examples: Sequence[Example],
    eval_examples: Sequence[Example],
    callbacks: Sequence[TrainerCallback],
) -> HotswapTrainer:
    """The trainer of ``trainable``: the method's callbacks first, then ``callbacks``; none of Trainer's printers."""
    try:
        trainer = HotswapTrainer(
            model=trainable.model,
            args=args,
            train_dataset=Examples(train_examples),
            eval_dataset=Examples(eval_examples),
            data_collator=collate,
            callbacks=[*trainable.callbacks(), *callbacks],
            trainable=trainable,
            eval_examples=eval_examples,
        )
    except ValueError as e:  # Trainer's own checks of its arguments, e.g. fsdp without a launcher
        raise InvalidArgument(f"cannot train with these settings: {e}") from None
    for printer in (PrinterCallback, ProgressCallback):  # Trainer's own: they print every step's logs
        trainer.remove_callback(printer)
    if (args.fsdp or args.deepspeed) and not trainer.sharded:  # e.g. FSDP on CPU processes: accelerate skips it
        raise InvalidArgument(f"{'fsdp' if args.fsdp else 'deepspeed'}: Trainer did not shard the model here "
                              "(it needs GPUs and a launcher); train without it")  # fmt: skip
    return trainer


def curve_of(history: list[dict[str, Any]]) -> tuple[list[Point], dict[int, tuple[float, float]]]:
    """Trainer's log history as the loss curve (a point per step) and the evaluations by step (0: untrained)."""
    train = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    evals = {entry["step"]: (entry["eval_loss"], entry["eval_accuracy"]) for entry in history if "eval_loss" in entry}
    curve = [(step, loss, evals[step][0] if step in evals else None) for step, loss in sorted(train.items())]
    return curve, evals
