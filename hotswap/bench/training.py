"""``hotswap bench train``: peak memory and step time of each training method vs full fine-tuning.

Each method runs in a fresh process (``python -m hotswap.bench.training``), so one method's allocator
state cannot inflate another's peak. A worker loads the base, attaches the method exactly as
``hotswap train`` does (or makes every weight trainable, for full fine-tuning; PLoRA offloads every
2 steps so its offloads are measured; proxy-tuning fine-tunes the small model given, beside the
loaded base and anti-expert), and times AdamW steps on a fixed random batch of the workload's shape
(batch x (prompt + new_tokens) tokens, loss on every token). Each method runs twice: as is, and with
gradient checkpointing (``hotswap train --gradient-checkpointing``; its ratios are against full
fine-tuning checkpointed the same way). Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU
the peak RSS above the RSS after imports (the model, gradients, optimizer state and activations,
without the Python/torch runtime), measured in a worker of its own with glibc's mmap threshold fixed
at 64 KiB (:data:`MEMORY_ENV`): every tensor then has its own mapping, returned to the OS when freed,
so the peak is that of live memory. With glibc's adaptive threshold, tensors freed between steps
stay in its heap, and how much stays depends on the allocation pattern, not on what a method needs
(LoRA measured ~900 MB above its live peak that way; ``malloc_trim`` gave it back). Step times come
from a worker with the default allocator (a mapping per tensor slows every step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

FULL = "full"


def methods() -> tuple[str, ...]:
    """Full fine-tuning, then every registered trainable method."""
    from hotswap.train import trainable_methods

    return (FULL, *trainable_methods())


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(
    method: str, base: str, batch: int, length: int, steps: int, device: str, small_model: str, checkpointing: bool
) -> dict[str, Any]:
    """One method's figures (run inside the worker process)."""
    from hotswap.basemodel import load_model
    from hotswap.train.data import Example
    from hotswap.train.methods import AttachContext, enable_gradient_checkpointing, method_options, trainable_methods
    from hotswap.train.trainer import token_losses

    baseline = _rss_bytes()
    torch.manual_seed(0)
    model = load_model(base, device=device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = [Example([], torch.randint(0, vocab, (length,), generator=g).tolist()) for _ in range(batch)]
    if method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = None
    else:
        options = {"plora": {"period": 2}, "proxy": {"small_model": small_model}}.get(method, {})

        def losses(m: torch.nn.Module, n: int) -> Iterator[torch.Tensor]:  # Fisher batches (sparse methods)
            return (token_losses(m, examples, device)[0].mean() for _ in range(n))

        context = AttachContext(steps, losses)
        trainable = trainable_methods()[method].attach(model, method_options(method, options), context)
        model = trainable.model.to(device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss = token_losses(model, examples, device)[0].mean()
        penalty = trainable.penalty() if trainable is not None else None
        optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        if trainable is not None and trainable.after_step(step):
            optimizer.state.clear()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {
        "method": method,
        "trainable_params": sum(p.numel() for p in params),
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),  # the first step warms up
        "peak_memory_mb": peak / 2**20,
    }


def train_bench(base: str, batch: int, length: int, steps: int, device: str, small_model: str) -> list[dict[str, Any]]:
    """Every method in its own process, without and with gradient checkpointing; ratios against full
    fine-tuning from the same run and mode. ``small_model``: the checkpoint proxy-tuning fine-tunes."""
    from hotswap.train.methods import trainable_methods

    rows = [_run_worker(method, base, batch, length, steps, device, small_model, False) for method in methods()]
    checkpointed = {
        method: _run_worker(method, base, batch, length, steps, device, small_model, True)
        for method in methods()
        if method == FULL or trainable_methods()[method].checkpointing
    }
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
    return rows


def _run_worker(
    method: str, base: str, batch: int, length: int, steps: int, device: str, small_model: str, checkpointing: bool
) -> dict[str, Any]:
    """One method's row: on CPU its step time from one worker and its memory from another (MEMORY_ENV)."""
    cmd = [sys.executable, "-m", "hotswap.bench.training", method, base, str(batch), str(length), str(steps), device,
           small_model, str(int(checkpointing))]  # fmt: skip

    def worker(env: dict[str, str]) -> dict[str, Any]:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode != 0:
            mode = " with gradient checkpointing" if checkpointing else ""
            raise RuntimeError(f"train bench worker for {method}{mode} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    timed = worker({})
    if device.startswith("cuda"):
        return timed
    return {**timed, "peak_memory_mb": worker(MEMORY_ENV)["peak_memory_mb"]}


def _worker() -> None:
    p = argparse.ArgumentParser()
    for name in ("method", "base"):
        p.add_argument(name)
    for name in ("batch", "length", "steps"):
        p.add_argument(name, type=int)
    p.add_argument("device")
    p.add_argument("small_model")
    p.add_argument("checkpointing", type=int, choices=(0, 1))
    a = p.parse_args()
    print(json.dumps(measure(a.method, a.base, a.batch, a.length, a.steps, a.device, a.small_model,
                             bool(a.checkpointing))))  # fmt: skip


if __name__ == "__main__":
    _worker()
