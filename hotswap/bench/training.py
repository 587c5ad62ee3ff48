"""``hotswap bench train``: peak memory and step time of each training method vs full fine-tuning, and of
``hotswap train``'s Trainer path (fp32 and bf16 mixed precision) vs the hand-written loop it replaced.

Each figure comes from a fresh process (``python -m hotswap.bench.training``), so one method's allocator
state cannot inflate another's peak. A worker loads the base, attaches the method exactly as
``hotswap train`` does (or makes every weight trainable, for full fine-tuning; PLoRA offloads every
2 steps so its offloads are measured; proxy-tuning fine-tunes the small model given, beside the
loaded base and anti-expert), and times optimizer steps on a fixed random batch of the workload's shape
(batch x (prompt + new_tokens) tokens, loss on every token) along one of three paths (:data:`PATHS`):

- ``loop``: the step ``hotswap train`` ran by hand before it moved to transformers' Trainer: forward, the
  method's penalty, backward, clipping to norm 1, ``torch.optim.AdamW``, a linear decay, and the method's
  callbacks called as Trainer calls them. Full fine-tuning runs this path only, as the reference.
- ``trainer``: ``hotswap train``'s own path, ``hotswap.train.hf.HotswapTrainer`` with the arguments
  ``hotswap train`` builds (Trainer's default fused AdamW, logging every step) but no evaluation; a step is
  the time between two step ends, so it includes loading the batch and logging.
- ``trainer-bf16``: the same with ``--bf16`` (autocast in bfloat16).

The loop also runs with gradient checkpointing (``hotswap train --gradient-checkpointing``; its ratios are
against full fine-tuning checkpointed the same way). Memory: on CUDA ``torch.cuda.max_memory_allocated``; on
CPU the peak RSS above the RSS after imports (the model, gradients, optimizer state and activations, without
the Python/torch runtime), measured in a worker of its own with glibc's mmap threshold fixed at 64 KiB
(:data:`MEMORY_ENV`): every tensor then has its own mapping, returned to the OS when freed, so the peak is that
of live memory. With glibc's adaptive threshold, tensors freed between steps stay in its heap, and how much
stays depends on the allocation pattern, not on what a method needs (LoRA measured ~900 MB above its live peak
that way; ``malloc_trim`` gave it back). Step times come from a worker with the default allocator (a mapping
per tensor slows every step).
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FULL = "full"
PATHS = ("loop", "trainer", "trainer-bf16")


def methods() -> tuple[str, ...]:
    """Full fine-tuning, then every registered trainable method."""
    from hotswap.train import trainable_methods

    return (FULL, *trainable_methods())


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _options(method: str, small_model: str) -> dict[str, Any]:
    return {"plora": {"period": 2}, "proxy": {"small_model": small_model}}.get(method, {})


def _attached(method: str, base: str, examples: list[Any], steps: int, device: str, small_model: str) -> Any:
    """The base with ``method`` attached as ``hotswap train`` attaches it (None for full fine-tuning: every weight
    of the base trains), and the model to train."""
    from hotswap.basemodel import load_model
    from hotswap.train.loss import collate, to_device, token_losses
    from hotswap.train.methods import AttachContext, method_options, trainable_methods

    torch.manual_seed(0)
    model = load_model(base, device=device)
    if method == FULL:
        return None, model.requires_grad_(True)
    batch = to_device(collate(examples), device)

    def losses(m: torch.nn.Module, n: int) -> Iterator[torch.Tensor]:  # Fisher batches (sparse methods)
        return (token_losses(m, batch).mean() for _ in range(n))

    options = method_options(method, _options(method, small_model))
    trainable = trainable_methods()[method].attach(model, options, AttachContext(steps, losses))
    return trainable, trainable.model.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _loop(model: torch.nn.Module, trainable: Any, examples: list[Any], steps: int, device: str) -> list[float]:
    """The hand-written step (see the module docstring); each step's seconds."""
    from transformers import TrainerControl, TrainerState

    from hotswap.train.loss import collate, to_device, token_losses

    batch = to_device(collate(examples), device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (steps + 1))
    callbacks, state, control = trainable.callbacks() if trainable else [], TrainerState(), TrainerControl()

    def event(name: str) -> None:
        for callback in callbacks:
            getattr(callback, name)(None, state, control, model=model, optimizer=optimizer)

    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        event("on_step_begin")
        loss = token_losses(model, batch).mean()
        penalty = trainable.penalty() if trainable is not None else None
        optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        event("on_optimizer_step")
        schedule.step()
        state.global_step += 1
        event("on_step_end")
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _trainer(
    method: str, trainable: Any, examples: list[Any], steps: int, device: str, small_model: str, bf16: bool
) -> list[float]:
    """``hotswap train``'s Trainer over the same batch; each step's seconds (step end to step end)."""
    from transformers import TrainerCallback

    from hotswap.train.config import TrainConfig
    from hotswap.train.hf import make_trainer, training_arguments

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_begin(self, args: object, state: object, control: object, **kwargs: object) -> None:
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
            _sync(device)
            ends.append(time.perf_counter())

    config = TrainConfig(method, _options(method, small_model), steps=steps, batch_size=len(examples), bf16=bf16,
                         device=device)  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:  # no evaluation: the loop has none either
        args = training_arguments(config, Path(run_dir), 1e-4, device, resume=False, evaluate=False)
        args.max_steps = steps
        make_trainer(trainable, args, examples * steps, examples[:1], [StepEnds()]).train()
    return [b - a for a, b in itertools.pairwise(ends)]


@dataclass(frozen=True)
class Job:
    """One worker's measurement: a method along one path, on the workload's fixed batch."""

    method: str
    base: str
    batch: int
    length: int
    steps: int
    device: str
    small_model: str  # the checkpoint proxy-tuning fine-tunes
    checkpointing: bool = False
    path: str = "loop"  # one of PATHS


def measure(job: Job) -> dict[str, Any]:
    """One method's figures along one path (run inside the worker process)."""
    from hotswap.train.data import Example
    from hotswap.train.methods import enable_gradient_checkpointing

    method, steps, device = job.method, job.steps, job.device
    baseline = _rss_bytes()
    g = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(job.base) / "config.json").read_text())["vocab_size"]
    examples = [Example([], torch.randint(0, vocab, (job.length,), generator=g).tolist()) for _ in range(job.batch)]
    trainable, model = _attached(method, job.base, examples, steps, device, job.small_model)
    if job.checkpointing:
        enable_gradient_checkpointing(model)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if job.path == "loop":
        times = _loop(model, trainable, examples, steps, device)
    else:
        times = _trainer(method, trainable, examples, steps, device, job.small_model, job.path == "trainer-bf16")
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {
        "method": method,
        "trainable_params": params,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),  # the first step warms up
        "peak_memory_mb": peak / 2**20,
    }


def train_bench(base: str, batch: int, length: int, steps: int, device: str, small_model: str) -> list[dict[str, Any]]:
    """Every method in its own processes: the loop without and with gradient checkpointing (ratios against full
    fine-tuning from the same run and mode), and the Trainer path in fp32 and bf16 (ratios against the loop, and
    bf16 against fp32). ``small_model``: the checkpoint proxy-tuning fine-tunes."""
    from hotswap.train.methods import trainable_methods

    def run(method: str, checkpointing: bool = False, path: str = "loop") -> dict[str, Any]:
        return _run_worker(Job(method, base, batch, length, steps, device, small_model, checkpointing, path))

    rows, checkpointed, trainer = [], {}, {}
    for m in methods():  # a method's figures one after the other: its ratios come from the same minutes
        rows.append(run(m))
        if m != FULL:
            trainer[m] = {path: run(m, path=path) for path in PATHS[1:]}
        if m == FULL or trainable_methods()[m].checkpointing:
            checkpointed[m] = run(m, True)
    full, lora, full_ckpt = rows[0], rows[1], checkpointed[FULL]
    for row in rows:
        row["label"] = "full fine-tuning" if row["method"] == FULL else row["method"]
        row["vs_full_memory"] = row["peak_memory_mb"] / full["peak_memory_mb"]
        row["vs_full_step"] = row["step_s"] / full["step_s"]
        row["vs_lora_memory"] = row["peak_memory_mb"] / lora["peak_memory_mb"]
        ckpt = checkpointed.get(row["method"])  # None: the method cannot train checkpointed (prefix)
        row["ckpt_peak_memory_mb"] = ckpt and ckpt["peak_memory_mb"]
        row["ckpt_vs_full_memory"] = ckpt and ckpt["peak_memory_mb"] / full_ckpt["peak_memory_mb"]
        row["ckpt_vs_full_step"] = ckpt and ckpt["step_s"] / full_ckpt["step_s"]
        row |= _trainer_columns(row, trainer.get(row["method"]))
    return rows


def _trainer_columns(loop: dict[str, Any], paths: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The Trainer path's figures beside the loop's (None for full fine-tuning, which runs the loop only)."""
    fp32, bf16 = (paths or {}).get("trainer"), (paths or {}).get("trainer-bf16")
    return {
        "trainer_step_s": fp32 and fp32["step_s"],
        "trainer_peak_memory_mb": fp32 and fp32["peak_memory_mb"],
        "trainer_vs_loop_step": fp32 and fp32["step_s"] / loop["step_s"],
        "trainer_vs_loop_memory": fp32 and fp32["peak_memory_mb"] / loop["peak_memory_mb"],
        "bf16_step_s": bf16 and bf16["step_s"],
        "bf16_peak_memory_mb": bf16 and bf16["peak_memory_mb"],
        "bf16_vs_fp32_step": bf16 and fp32 and bf16["step_s"] / fp32["step_s"],
        "bf16_vs_fp32_memory": bf16 and fp32 and bf16["peak_memory_mb"] / fp32["peak_memory_mb"],
    }


def _run_worker(job: Job) -> dict[str, Any]:
    """One method's figures along one path: on CPU its step time from one worker and its memory from another
    (MEMORY_ENV)."""
    cmd = [sys.executable, "-m", "hotswap.bench.training", json.dumps(asdict(job))]

    def worker(env: dict[str, str]) -> dict[str, Any]:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode != 0:
            mode = " with gradient checkpointing" if job.checkpointing else ""
            raise RuntimeError(f"train bench worker for {job.method} ({job.path}){mode} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    timed = worker({})
    if job.device.startswith("cuda"):
        return timed
    return {**timed, "peak_memory_mb": worker(MEMORY_ENV)["peak_memory_mb"]}


def _worker() -> None:
    """The worker process: ``python -m hotswap.bench.training JOB_JSON``; prints the figures as JSON."""
    print(json.dumps(measure(Job(**json.loads(sys.argv[1])))))


if __name__ == "__main__":
    _worker()
