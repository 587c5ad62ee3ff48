"""Train an adapter on a frozen base, evaluate it, write the artifact and its loss curve, and publish.

    result = train(TrainConfig(method="lora", options={"rank": 8}, steps=200),
                   base="path/to/base", data="builtin:mapping", out="runs/math", push="math",
                   registry="path-or-url", aliases=["staging"])

Everything is written under ``out`` (``adapter/``, ``loss_curve.csv``, ``loss_curve.png``), each file
atomically; publishing is the last step, so a run that fails publishes nothing.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hotswap import __version__
from hotswap.basemodel import bundled_tokenizer, encode_prompt, fingerprint, load_model
from hotswap.devices import DTYPE_CHOICES, resolve_dtype, torch_dtype
from hotswap.errors import InvalidArgument
from hotswap.registry import Lineage, Manifest, Registry
from hotswap.registry.fsutil import building_dir
from hotswap.serve.adapters import base_checker
from hotswap.train.curve import Point, write_csv, write_png
from hotswap.train.data import BUILTIN_PREFIX, Dataset, Example, TextCodec, load_data
from hotswap.train.methods import AttachContext, enable_gradient_checkpointing, method_options, trainable_methods

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (e.g. rank, alpha)
    steps: int | None = None  # optimizer steps; default 200 unless epochs is given
    epochs: float | None = None  # passes over the training data (instead of steps)
    lr: float | None = None  # default: the method's (the method's spec)
    batch_size: int = 16
    seed: int = 0
    eval_every: int = 50  # steps between evaluations (and at the end)
    data_size: int = 512  # examples drawn from a built-in task
    device: str = "cpu"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about 1/3 more time
    dtype: str = "auto"  # the base's while training (auto: hotswap.devices.resolve_dtype); adapters train in fp32

    def __post_init__(self) -> None:
        method_options(self.method, self.options)  # unknown method / foreign options fail here
        if self.steps is not None and self.epochs is not None:
            raise InvalidArgument("give steps or epochs, not both")
        for name in ("steps", "batch_size", "eval_every", "data_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value}")
        if self.epochs is not None and self.epochs <= 0:
            raise InvalidArgument(f"epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if self.dtype not in DTYPE_CHOICES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.gradient_checkpointing and not trainable_methods()[self.method].checkpointing:
            raise InvalidArgument(
                f"{self.method} cannot train with gradient checkpointing (its virtual tokens reach the layers "
                "through the KV cache, which checkpointed layers drop)"
            )


@dataclass
class TrainResult:
    artifact: Path
    metrics: dict[str, Any]
    curve: list[Point]
    manifest: Manifest | None  # set when published
    model: torch.nn.Module  # the trained model (base + adapter), in eval mode


def _codec(base: Path, model: torch.nn.Module) -> TextCodec | None:
    tokenizer = bundled_tokenizer(base)
    if tokenizer is None:
        return None
    cfg = model.config
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    return TextCodec(
        encode_prompt=lambda text: encode_prompt(tokenizer, text, cfg.bos_token_id),
        encode_text=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        eos_id=eos,
    )


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


def _batch(examples: list[Example], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of the positions whose next token is a target."""
    seqs = [ex.prompt + ex.completion for ex in examples]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    target = torch.zeros(len(seqs), width, dtype=torch.bool)  # target[i, t]: ids[i, t+1] is scored
    for i, (ex, seq) in enumerate(zip(examples, seqs, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        target[i, max(len(ex.prompt) - 1, 0) : len(seq) - 1] = True
    return ids.to(device), attention.to(device), target.to(device)


def token_losses(model: torch.nn.Module, examples: list[Example], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token cross-entropy, and per-example exact match of the greedy (teacher-forced) tokens."""
    ids, attention, target = _batch(examples, device)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -ids.shape[1] :]  # drop virtual tokens
    pred, gold, mask = logits[:, :-1], ids[:, 1:], target[:, :-1]
    losses = torch.nn.functional.cross_entropy(pred[mask].float(), gold[mask], reduction="none")
    wrong = (pred.argmax(-1) != gold) & mask
    return losses, ~wrong.any(dim=1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: Dataset, batch_size: int, device: str) -> tuple[float, float]:
    """(mean token loss, exact-match accuracy) over ``ds``."""
    was_training = model.training
    model.eval()
    losses, correct = [], []
    for i in range(0, len(ds.examples), batch_size):
        batch_losses, exact = token_losses(model, ds.examples[i : i + batch_size], device)
        losses.append(batch_losses)
        correct.append(exact)
    model.train(was_training)
    return torch.cat(losses).mean().item(), torch.cat(correct).float().mean().item()


def _peak_memory_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _first_losses(train_ds: Dataset, config: TrainConfig, m: torch.nn.Module, n: int) -> Iterator[torch.Tensor]:
    """The losses of the first ``n`` training batches (methods that estimate Fisher information need them)."""
    for i in range(n):
        batch = train_ds.examples[i * config.batch_size : (i + 1) * config.batch_size]
        if batch:
            yield token_losses(m, batch, config.device)[0].mean()


def _fit(
    model: torch.nn.Module,
    trainable: Any,
    params: list[torch.nn.Parameter],
    train_ds: Dataset,
    eval_ds: Dataset,
    config: TrainConfig,
    steps: int,
    lr: float,
    quiet: bool,
) -> tuple[list[Point], tuple[float, float], tuple[float, float], float]:
    """The training loop: AdamW with linear decay, the method's penalty and step hook, evaluation every
    ``eval_every`` steps. Returns the loss curve, eval (loss, accuracy) before and after, and the seconds."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (steps + 1))
    eval_loss_start, eval_acc_start = evaluate(model, eval_ds, config.batch_size, config.device)

    rng = random.Random(config.seed)
    order: list[int] = []
    curve: list[Point] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc=f"train {config.method}", disable=quiet or not sys.stderr.isatty(), unit="step")
    eval_loss, eval_acc = eval_loss_start, eval_acc_start
    for step in range(1, steps + 1):
        if len(order) < config.batch_size:
            fresh = list(range(len(train_ds.examples)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [train_ds.examples[i] for i in order[: config.batch_size]], order[config.batch_size :]
        losses, _ = token_losses(model, batch, config.device)
        loss = losses.mean()
        penalty = trainable.penalty()
        optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if trainable.after_step(step):
            optimizer.state.clear()  # e.g. PLoRA restarted its factors
        evaluated = step % config.eval_every == 0 or step == steps
        if evaluated:
            eval_loss, eval_acc = evaluate(model, eval_ds, config.batch_size, config.device)
            log.info("step %d/%d: train loss %.4f, eval loss %.4f, eval accuracy %.3f", step, steps, loss.item(),
                     eval_loss, eval_acc)  # fmt: skip
        curve.append((step, loss.item(), eval_loss if evaluated else None))
        bar.set_postfix(loss=f"{loss.item():.4f}", eval=f"{eval_loss:.4f}")
        bar.update()
    bar.close()
    model.eval()
    return curve, (eval_loss_start, eval_acc_start), (eval_loss, eval_acc), time.perf_counter() - start


def _export(
    trainable: Any,
    model: torch.nn.Module,
    curve: list[Point],
    before: tuple[float, float],
    after: tuple[float, float],
    steps: int,
    seconds: float,
    config: TrainConfig,
    out_dir: Path,
) -> dict[str, Any]:
    """Write ``out_dir/adapter`` (atomically) and the loss curve; return the run's metrics."""
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
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
        "peak_memory_bytes": _peak_memory_bytes(config.device),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with building_dir(out_dir / "adapter") as tmp:
        metrics |= trainable.export(tmp)
    write_csv(out_dir / "loss_curve.csv", curve)
    write_png(out_dir / "loss_curve.png", curve)
    return metrics


def _parent(config: TrainConfig, reg: Registry, parent: str, base_path: Path) -> tuple[Manifest, Path]:
    """The published version ``parent`` to continue from, checked against the method and the base."""
    if trainable_methods()[config.method].resume is None:
        raise InvalidArgument(f"{config.method} cannot continue from a parent version (it restructures the adapter)")
    if config.options:
        raise InvalidArgument("with a parent, the adapter's shape comes from the parent: drop the method options")
    parent_manifest, parent_dir = reg.fetch(parent, base_fingerprint=fingerprint(base_path))
    if parent_manifest.method != config.method:
        raise InvalidArgument(f"parent {parent_manifest.ref} is {parent_manifest.method}, not {config.method}")
    return parent_manifest, parent_dir


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
) -> TrainResult:
    """Train, evaluate, write ``out/adapter`` and the loss curve, and publish as ``push`` if given.

    ``parent`` (a ref in ``registry``) continues training from that published version; the new version
    records it as its lineage parent."""
    base_path, out_dir = Path(base), Path(out)
    if (out_dir / "adapter").exists():
        raise InvalidArgument(f"{out_dir / 'adapter'} already exists; train into a new --out directory")
    options = method_options(config.method, config.options)
    reg = (registry if isinstance(registry, Registry) else Registry(registry)) if push or parent else None
    parent_manifest, parent_dir = _parent(config, reg, parent, base_path) if parent and reg else (None, None)
    torch.manual_seed(config.seed)
    dtype = resolve_dtype(config.dtype, base_path, config.device)
    model = load_model(base_path, dtype=torch_dtype(dtype), device=config.device)
    train_ds, eval_ds, eval_source = _datasets(data, eval_data, _codec(base_path, model), config)
    for ds in (train_ds, eval_ds):
        top = max(max(ex.prompt + ex.completion) for ex in ds.examples)
        if top >= model.config.vocab_size:
            raise InvalidArgument(
                f"{ds.name}: token id {top} is outside the base's vocabulary ({model.config.vocab_size})"
            )
    first_losses = partial(_first_losses, train_ds, config)
    per_epoch = -(-len(train_ds.examples) // config.batch_size)
    steps = config.steps or max(1, round(config.epochs * per_epoch) if config.epochs else 200)
    if parent_dir is not None:
        trainable = trainable_methods()[config.method].resume(model, parent_dir)
    else:
        trainable = trainable_methods()[config.method].attach(model, options, AttachContext(steps, first_losses))
    model = trainable.model.to(config.device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    lr = config.lr or trainable_methods()[config.method].lr
    log.info("%s: %d trainable parameters (%.3f%%), %d steps, lr %g, base in %s", config.method, n_trainable,
             100 * n_trainable / n_total, steps, lr, dtype)  # fmt: skip
    curve, (eval_loss_start, eval_acc_start), (eval_loss, eval_acc), seconds = _fit(
        model, trainable, params, train_ds, eval_ds, config, steps, lr, quiet
    )
    metrics = _export(trainable, model, curve, (eval_loss_start, eval_acc_start), (eval_loss, eval_acc), steps,
                      seconds, config, out_dir)  # fmt: skip
    manifest = None
    if push is not None and reg is not None:
        training_config = {
            **asdict(config),
            "dtype": dtype,  # what "auto" resolved to
            "options": asdict(options) if parent_manifest is None else {"from_parent": parent_manifest.ref},
            "lr": lr,
            "steps": steps,
            "data": data,
            "eval_data": eval_data or eval_source,
        }
        lineage = Lineage(
            parent=parent_manifest.ref if parent_manifest else None,
            training_config=training_config,
            data_digest=train_ds.digest,
            code_version=f"hotswap {__version__}",
        )
        manifest = reg.publish(out_dir / "adapter", push, method=config.method, base_fingerprint=fingerprint(base_path),
                               aliases=list(aliases), lineage=lineage, metrics=metrics, visibility=visibility,
                               description=description, check=base_checker(base_path))  # fmt: skip
    return TrainResult(out_dir / "adapter", metrics, curve, manifest, model)
