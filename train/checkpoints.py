"""Checkpoints of a run, for ``resume``: Trainer's ``checkpoint-N`` folders in the run directory, holding what our
methods need besides Trainer's own optimizer, scheduler, RNG and state files.

A checkpoint holds the trainable parameters by name (``trainable.safetensors``: an adapter's factors, BitFit's
deltas, a sparse method's target weights, proxy-tuning's expert) and the method's own state
(``method_state.safetensors``: PLoRA's offloads, AdaLoRA's importance scores), never the frozen base, which a
resumed run loads again. Trainer writes ``trainer_state.json`` last, so a folder without it was cut short and is
skipped. ``run.json`` beside the checkpoints records the run's settings; a resume with other settings is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hotswap.errors import InvalidArgument
from hotswap.fsutil import atomic_write_bytes
from hotswap.methods.api.trainable import Trainable

TRAINABLE = "trainable.safetensors"
METHOD_STATE = "method_state.safetensors"
RUN = "run.json"
_COMPLETE = "trainer_state.json"  # Trainer's, written last
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest step first."""
    found = [
        (int(m.group(1)), p)
        for p in run_dir.glob("checkpoint-*")
        if (m := _CHECKPOINT.fullmatch(p.name)) and (p / _COMPLETE).is_file()
    ]
    return [p for _, p in sorted(found)]


def start(run_dir: Path, settings: dict[str, Any], resume: bool) -> Path | None:
    """Check the run directory for a new run (no checkpoints of another run) or a resume (a checkpoint of a run
    with the same ``settings``); returns the checkpoint to continue from, if any."""
    found = checkpoints(run_dir)
    if not resume:
        if found:
            raise InvalidArgument(
                f"{run_dir} holds checkpoints of an interrupted run: resume it, or train into a new directory"
            )
        return None
    if not found:
        raise InvalidArgument(f"nothing to resume: {run_dir} holds no complete checkpoint")
    recorded = json.loads((run_dir / RUN).read_text()) if (run_dir / RUN).is_file() else None
    if recorded != json.loads(json.dumps(settings)):  # as JSON would have it (tuples as lists)
        changed = sorted(k for k in {*settings, *(recorded or {})} if (recorded or {}).get(k) != settings.get(k))
        raise InvalidArgument(f"cannot resume {run_dir}: started with other settings ({', '.join(changed)})")
    return found[-1]


def record(run_dir: Path, settings: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / RUN, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())


def _trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save(checkpoint: Path, model: torch.nn.Module, trainable: Trainable) -> None:
    checkpoint.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().cpu().contiguous() for name, p in _trainable_parameters(model).items()}
    save_file(params, checkpoint / TRAINABLE)
    save_file({k: t.detach().cpu().contiguous() for k, t in trainable.state().items()}, checkpoint / METHOD_STATE)


def load(checkpoint: Path, model: torch.nn.Module, trainable: Trainable) -> None:
    """Restore the trainable parameters, then the method's state, into a freshly attached ``model``."""
    if not (checkpoint / TRAINABLE).is_file():
        raise InvalidArgument(f"{checkpoint}: no {TRAINABLE} (not a checkpoint of hotswap train)")
    saved = load_file(checkpoint / TRAINABLE)
    params = _trainable_parameters(model)
    if saved.keys() != params.keys():
        different = sorted(saved.keys() ^ params.keys())
        raise InvalidArgument(f"{checkpoint}: its parameters do not match this model's ({', '.join(different[:5])})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    trainable.load_state(load_file(checkpoint / METHOD_STATE))
