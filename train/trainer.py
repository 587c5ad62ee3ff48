"""Train an adapter on a frozen base, evaluate it, write the artifact and its loss curve, and publish.

    result = train(TrainConfig(method="lora", options={"rank": 8}, steps=200),
                   base="path/to/base", data="builtin:mapping", out="runs/math", push="math",
                   registry="path-or-url", aliases=["staging"])

The loop is transformers' ``Trainer`` (``hotswap.train.hf``); this module sets a run up around it: the data,
the base and the method attached to it, the checkpoint a resume continues from, and afterwards the artifact,
the curve and the publish. Under a launcher (``torchrun``, ``accelerate launch``) every process runs this, each
on its share of every batch; only the first process writes files and publishes.

Everything is written under ``out`` (``adapter/``, ``loss_curve.csv``, ``loss_curve.png``, Trainer's
``checkpoint-N/`` with ``save_steps``), each file atomically; publishing is the last step, so a run that fails
publishes nothing.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hotswap import __version__
from hotswap.basemodel import bundled_tokenizer, check_checkpoint, fingerprint, load_model
from hotswap.devices import cpu_has_bf16, resolve_device, resolve_dtype, torch_dtype
from hotswap.errors import InvalidArgument
from hotswap.fsutil import building_dir
from hotswap.methods import base_checker
from hotswap.methods.api.trainable import Trainable
from hotswap.quantization import check_quantize
from hotswap.registry import Lineage, Manifest, Registry
from hotswap.train import checkpoints
from hotswap.train.config import TrainConfig
from hotswap.train.curve import Point, write_csv, write_png
from hotswap.train.data import BUILTIN_PREFIX, Dataset, TextCodec, load_data, text_codec
from hotswap.train.hf import HotswapTrainer, Progress, curve_of, make_trainer, training_arguments
from hotswap.train.loss import collate, evaluate, to_device, token_losses
from hotswap.train.methods import AttachContext, enable_gradient_checkpointing, method_options, trainable_methods

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]


@dataclass
class TrainResult:
    artifact: Path
    metrics: dict[str, Any]
    curve: list[Point]
    manifest: Manifest | None  # set when published
    model: torch.nn.Module  # the trained model (base + adapter), in eval mode
    primary: bool = True  # the process that wrote the files and published (False: another data-parallel one)


def _datasets(
    data: str, eval_data: str | None, codec: TextCodec | None, config: TrainConfig
) -> tuple[Dataset, Dataset, str]:
    """(train, eval, where eval comes from)."""
    train_ds = load_data(data, codec, size=config.data_size, seed=config.seed)
    if eval_data is not None:
        return train_ds, load_data(eval_data, codec, size=128, seed=config.seed + 10_000), eval_data
    if data.startswith(BUILTIN_PREFIX):
        return train_ds, load_data(data, codec, size=128, seed=config.seed + 10_000), "fresh draw of the task"
    if len(train_ds.examples) >= 10:  # hold out every 10th record
        held = [ex for i, ex in enumerate(train_ds.examples) if i % 10 == 9]
        kept = [ex for i, ex in enumerate(train_ds.examples) if i % 10 != 9]
        return Dataset(train_ds.name, kept, train_ds.digest), Dataset.of(train_ds.name, held), "every 10th record"
    return train_ds, train_ds, "the training data (fewer than 10 records)"


def _peak_memory_bytes(device: str | torch.device) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _first_losses(
    train_ds: Dataset, batch_size: int, device: torch.device, m: torch.nn.Module, n: int
) -> Iterator[torch.Tensor]:
    """The mean losses of the first ``n`` training batches (methods that estimate Fisher information need them);
    every data-parallel process takes the same ones, so their masks agree."""
    for i in range(n):
        batch = train_ds.examples[i * batch_size : (i + 1) * batch_size]
        if batch:
            yield token_losses(m, to_device(collate(batch), device)).mean()


def _device(config: TrainConfig) -> str:
    """The device to train on (a launcher's processes each take their own GPU: ``cuda``)."""
    device = resolve_device(config.device)
    if device.startswith("cuda:") and torch.device(device).index != 0:
        raise InvalidArgument(
            f"device {device}: train on one chosen GPU with CUDA_VISIBLE_DEVICES={torch.device(device).index} and "
            "device cuda, or on several with torchrun / accelerate launch"
        )
    return device


def _check_precision(config: TrainConfig, dtype: str, device: str) -> None:
    """Mixed precision the device can run, over a base it can run on: refused here in one line."""
    on_cuda = device.startswith("cuda")
    if config.fp16 and not on_cuda:
        raise InvalidArgument("fp16 mixed precision needs a CUDA device (loss scaling); on a CPU train with bf16")
    if config.bf16 and on_cuda and not torch.cuda.is_bf16_supported():
        raise InvalidArgument(f"bf16: {torch.cuda.get_device_name()} has no bfloat16 (an Ampere or newer GPU has)")
    if (config.bf16 and dtype == "float16") or (config.fp16 and dtype == "bfloat16"):
        raise InvalidArgument(f"{config.mixed_precision} mixed precision over a {dtype} base: use one half type")
    if config.bf16 and not on_cuda and not cpu_has_bf16():
        log.warning("bf16 on a CPU without native bfloat16: emulated, expect it slower than float32")


@contextmanager
def _library_bars(shown: bool) -> Iterator[None]:
    """transformers' and the Hub's own progress bars (loading and writing weights) off while ``shown`` is False."""
    was = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            hf_logging.enable_progress_bar()


def _parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def _export(
    trainable: Trainable,
    model: torch.nn.Module,
    curve: list[Point],
    before: tuple[float, float],
    after: tuple[float, float],
    steps: int,
    seconds: float,
    device: torch.device,
    out_dir: Path,
    gathered: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Write ``out_dir/adapter`` (atomically) and the loss curve; return the run's metrics. ``gathered``: the full
    weights of a sharded run (DeepSpeed / FSDP), which only PEFT's methods allow and PEFT saves."""
    n_trainable, n_total = _parameter_counts(model)
    metrics: dict[str, Any] = {
        "train_loss": curve[-1][1],
        "eval_loss": after[0],
        "eval_accuracy": after[1],
        "eval_loss_untrained": before[0],
        "eval_accuracy_untrained": before[1],
        "trainable_params": n_trainable,
        "trainable_pct": 100 * n_trainable / n_total,
        "steps": steps,
        "wall_seconds": seconds,
        "peak_memory_bytes": _peak_memory_bytes(device),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with building_dir(out_dir / "adapter") as tmp:
        if gathered is None:
            metrics |= trainable.export(tmp)
        else:
            trainable.model.save_pretrained(tmp, state_dict=gathered)
    write_csv(out_dir / "loss_curve.csv", curve)
    write_png(out_dir / "loss_curve.png", curve)
    return metrics


def _parent(config: TrainConfig, reg: Registry, parent: str, base_path: Path) -> tuple[Manifest, Path]:
    """The published version ``parent`` to continue from, checked against the method and the base."""
    if trainable_methods()[config.method].resume is None:
        raise InvalidArgument(f"{config.method} cannot continue from a parent version (it restructures the adapter)")
    if config.options:
        raise InvalidArgument("with a parent, the adapter's shape comes from the parent: drop the method options")
    parent_manifest, parent_dir = reg.fetch(parent, base_fingerprint=fingerprint(base_path, config.quantized))
    if parent_manifest.method != config.method:
        raise InvalidArgument(f"parent {parent_manifest.ref} is {parent_manifest.method}, not {config.method}")
    return parent_manifest, parent_dir


def _settings(config: TrainConfig, base: Path, data: str, eval_data: str | None, parent: str | None) -> dict:
    """What a resumed run must share with the interrupted one (everything but where it reports)."""
    recorded = {k: v for k, v in asdict(config).items() if k != "report_to"}
    return {**recorded, "base": str(base.resolve()), "data": data, "eval_data": eval_data, "parent": parent}


def _steps(config: TrainConfig, examples: int, per_step: int) -> int:
    """Optimizer steps: ``steps``, else ``epochs`` passes of ``per_step`` examples each, else 200."""
    if config.steps:
        return config.steps
    return max(1, round(config.epochs * math.ceil(examples / per_step))) if config.epochs else 200


def _publish(
    reg: Registry,
    run: dict[str, Any],
    metrics: dict[str, Any],
    base_path: Path,
    out_dir: Path,
    push: str,
    parent_manifest: Manifest | None,
    data_digest: str,
    aliases: Sequence[str],
    visibility: str | None,
    description: str,
) -> Manifest:
    lineage = Lineage(
        parent=parent_manifest.ref if parent_manifest else None,
        training_config=run,
        data_digest=data_digest,
        code_version=f"hotswap {__version__}",
    )
    quantize = check_quantize(run["quantize"])  # the lineage records it (TrainConfig's)
    base_fp = fingerprint(base_path, quantize)
    return reg.publish(out_dir / "adapter", push, method=run["method"], base_fingerprint=base_fp,
                       aliases=list(aliases), lineage=lineage, metrics=metrics, visibility=visibility,
                       description=description, check=base_checker(base_path, quantize))  # fmt: skip


@dataclass
class _Run:
    """A run set up: Trainer's arguments, the data, and the method attached to the base."""

    args: TrainingArguments
    trainable: Trainable
    train_ds: Dataset
    eval_ds: Dataset
    eval_source: str  # where the eval data comes from (the lineage's eval_data)
    dtype: str  # the base's, as "auto" resolved
    steps: int
    per_step: int  # examples per optimizer step over all processes: the effective batch


def _prepare(
    config: TrainConfig,
    base_path: Path,
    data: str,
    eval_data: str | None,
    out_dir: Path,
    parent_dir: Path | None,
    resuming: bool,
    options: Any,
) -> _Run:
    """Trainer's arguments (which start the process group under a launcher), then the base on this process's
    device, the data, and the method attached (or the parent version loaded)."""
    spec = trainable_methods()[config.method]
    device = _device(config)
    args = training_arguments(config, out_dir, config.lr or spec.lr, device, resuming)
    dtype = resolve_dtype(config.dtype, base_path, device)
    _check_precision(config, dtype, device)
    if config.quantized and not spec.sharding:
        raise InvalidArgument(
            f"quantize {config.quantize}: {config.method} trains state of its own beside PEFT's; over a quantized "
            f"base train one of PEFT's methods ({', '.join(n for n, s in trainable_methods().items() if s.sharding)})"
        )
    model = load_model(base_path, dtype=torch_dtype(dtype), device=args.device, quantize=config.quantized)
    if config.quantized:  # QLoRA: PEFT's k-bit preparation (norms in float32, input gradients for checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    codec = text_codec(bundled_tokenizer(base_path), model.config)
    train_ds, eval_ds, eval_source = _datasets(data, eval_data, codec, config)
    for ds in (train_ds, eval_ds):
        top = max(max(ex.prompt + ex.completion) for ex in ds.examples)
        if top >= model.config.vocab_size:
            raise InvalidArgument(
                f"{ds.name}: token id {top} is outside the base's vocabulary ({model.config.vocab_size})"
            )
    per_step = args.train_batch_size * config.gradient_accumulation_steps * args.world_size
    args.max_steps = steps = _steps(config, len(train_ds.examples), per_step)
    torch.manual_seed(config.seed)
    if parent_dir is not None:
        trainable = spec.resume(model, parent_dir)
    else:
        first_losses = partial(_first_losses, train_ds, config.batch_size, args.device)
        trainable = spec.attach(model, options, AttachContext(steps, first_losses, config.seed))
    trainable.model.to(args.device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(trainable.model)
    return _Run(args, trainable, train_ds, eval_ds, eval_source, dtype, steps, per_step)


def _fit(
    run: _Run, config: TrainConfig, resume_from: Path | None, callbacks: Sequence[TrainerCallback]
) -> tuple[HotswapTrainer, float]:
    """Trainer's loop over the run; returns the trainer and the seconds it took. The model ends in eval mode, in
    its own precision (mixed precision wraps its forward in autocast while it trains, evaluations included) and
    with its KV-cache setting as it was (Trainer turns it off for training)."""
    model = run.trainable.model
    n_trainable, n_total = _parameter_counts(model)
    log.info("%s: %d trainable parameters (%.3f%%), %d steps of %d examples, lr %g, base in %s, %d process(es)",
             config.method, n_trainable, 100 * n_trainable / n_total, run.steps, run.per_step, run.args.learning_rate,
             run.dtype, run.args.world_size)  # fmt: skip
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    trainer = make_trainer(run.trainable, run.args, run.train_ds.examples, run.eval_ds.examples, callbacks)
    start = time.perf_counter()
    trainer.train_from(resume_from)
    seconds = time.perf_counter() - start
    trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False)  # mixed precision's autocast off
    model.eval()
    if use_cache is not None:
        model.config.use_cache = use_cache
    return trainer, seconds


def _lineage_config(
    config: TrainConfig,
    run: _Run,
    options: Any,
    parent_manifest: Manifest | None,
    data: str,
    eval_data: str | None,
    resume_from: Path | None,
) -> dict[str, Any]:
    """The training config a published version records: the config, and what the run made of it."""
    return {
        **asdict(config),
        "dtype": run.dtype,  # what "auto" resolved to
        "options": asdict(options) if parent_manifest is None else {"from_parent": parent_manifest.ref},
        "lr": run.args.learning_rate,
        "steps": run.steps,
        "data": data,
        "eval_data": eval_data or run.eval_source,
        "precision": config.mixed_precision,  # what forward and backward computed in (no: the weights' dtypes)
        "lr_scheduler": config.scheduler(),  # transformers' name, warmup included
        "world_size": run.args.world_size,
        "effective_batch_size": run.per_step,
        **({"resumed_from_step": int(resume_from.name.split("-")[1])} if resume_from else {}),
    }


def train(
    config: TrainConfig,
    base: str | os.PathLike[str],
    data: str,
    out: str | os.PathLike[str],
    *,
    eval_data: str | None = None,
    push: str | None = None,
    registry: Registry | str | os.PathLike[str] | None = None,
    aliases: tuple[str, ...] | list[str] = (),
    visibility: str | None = None,
    description: str = "",
    parent: str | None = None,
    quiet: bool = False,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train, evaluate, write ``out/adapter`` and the loss curve, and publish as ``push`` if given.

    ``parent`` (a ref in ``registry``) continues training from that published version; the new version
    records it as its lineage parent. ``resume`` continues an interrupted run in ``out`` from its last
    checkpoint (``save_steps``), with the same settings; it ends as the uninterrupted run would have.
    ``callbacks``: more ``TrainerCallback``s (after the method's own)."""
    base_path, out_dir = Path(base), Path(out)
    if (out_dir / "adapter").exists():
        raise InvalidArgument(f"{out_dir / 'adapter'} already exists; train into a new --out directory")
    options = method_options(config.method, config.options)
    check_checkpoint(base_path)
    reg = (registry if isinstance(registry, Registry) else Registry(registry)) if push or parent else None
    parent_manifest, parent_dir = _parent(config, reg, parent, base_path) if parent and reg else (None, None)
    settings = _settings(config, base_path, data, eval_data, parent)
    resume_from = checkpoints.start(out_dir, settings, resume)
    with _library_bars(not quiet):
        run = _prepare(config, base_path, data, eval_data, out_dir, parent_dir, resume_from is not None, options)
        if resume_from is None and run.args.should_save:
            checkpoints.record(out_dir, settings)
        progress = Progress(f"train {config.method}", not quiet)
        trainer, seconds = _fit(run, config, resume_from, [progress, *callbacks])
        model, step = run.trainable.model, trainer.state.global_step
        curve, evals = curve_of(trainer.state.log_history)
        gathered = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.sharded else None
        if not trainer.is_world_process_zero():  # the first process writes and publishes
            return TrainResult(out_dir / "adapter", {}, curve, None, model, primary=False)
        metrics = _export(run.trainable, model, curve, evals[0], evals[step], step, seconds, run.args.device, out_dir,
                          gathered)  # fmt: skip
        manifest = None
        if push is not None and reg is not None:  # its check loads the base: under the same bars
            lineage = _lineage_config(config, run, options, parent_manifest, data, eval_data, resume_from)
            manifest = _publish(reg, lineage, metrics, base_path, out_dir, push, parent_manifest, run.train_ds.digest,
                                aliases, visibility, description)  # fmt: skip
    return TrainResult(out_dir / "adapter", metrics, curve, manifest, model)
