"""Resuming an interrupted run: a run killed (SIGKILL) right after a checkpoint, resumed with `--resume`, ends with
the adapter, loss curve and eval figures of the same run uninterrupted, bit for bit, and publishes once. The methods
with state of their own are each covered (interrupted in-process): PLoRA's offloads (replayed into the backbone),
AdaLoRA's importance scores, DyLoRA's per-step rank and Child-tuning's per-step masks (from the restored RNG / step)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from hotswap.cli import main
from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.train import TrainConfig, train
from tests.train.artifacts import adapter_tensors

STEPS, SAVE, KILL = 10, 3, 6  # checkpoints at 3, 6, 9 (and 10); killed right after the one at 6

KILLED_RUN = """
import os, signal
from transformers import TrainerCallback
from hotswap.train import TrainConfig, train
from tests.train.artifacts import adapter_tensors

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == {kill}:
            os.kill(os.getpid(), signal.SIGKILL)

train(TrainConfig(**{config!r}), {base!r}, "builtin:mapping", {out!r}, quiet=True, callbacks=[KillAfterSave()])
raise SystemExit("not killed")
"""


def _kill_after_checkpoint(config: dict, base: Path, out: Path) -> None:
    script = KILLED_RUN.format(kill=KILL, config=config, base=str(base), out=str(out))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (out / "adapter").exists()


def _assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    want, got = adapter_tensors(uninterrupted / "adapter"), adapter_tensors(resumed / "adapter")
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert (resumed / "loss_curve.csv").read_text() == (uninterrupted / "loss_curve.csv").read_text()


def test_cli_resume_after_sigkill_matches_the_uninterrupted_run(trainable_base: Path, tmp_path: Path) -> None:
    """`hotswap train --resume` (LoRA; the killed run had the CLI's settings), published exactly once."""
    config = {"method": "lora", "steps": STEPS, "save_steps": SAVE}
    _kill_after_checkpoint(config, trainable_base, tmp_path / "run")
    reg = tmp_path / "registry"
    args = ["--registry", str(reg), "train", "--method", "lora", "--base", str(trainable_base), "--data",
            "builtin:mapping", "--steps", str(STEPS), "--save-steps", str(SAVE), "--quiet",
            "--push", "math"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    reference = train(TrainConfig(**config), trainable_base, "builtin:mapping", tmp_path / "ref", quiet=True)
    _assert_same_run(tmp_path / "run", tmp_path / "ref")
    versions = Registry(reg).versions("math")
    assert [v.version for v in versions] == [1]
    recorded = versions[0].lineage.training_config
    assert recorded["resumed_from_step"] == KILL and recorded["steps"] == STEPS
    assert versions[0].metrics["eval_loss"] == reference.metrics["eval_loss"]
    # the finished run cannot be resumed again, nor published twice
    assert main([*args, "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert [v.version for v in Registry(reg).versions("math")] == [1]


class Interrupted(Exception):
    pass


class StopAfterSave(TrainerCallback):
    """Ends the run right after the checkpoint at KILL, as a crash would (in-process: the same fresh start from the
    checkpoint on resume, without a second interpreter per method)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == KILL:
            raise Interrupted


@pytest.mark.parametrize(
    ("method", "options"),
    [("plora", {"period": 4}), ("adalora", {}), ("dylora", {}), ("child-tuning", {"variant": "f", "density": 0.3})],
)
def test_resume_restores_the_methods_own_state(
    method: str, options: dict, trainable_base: Path, tmp_path: Path
) -> None:
    """64 examples in batches of 16: the checkpoint at step 6 is in the second epoch, so the resume also skips
    into the middle of an epoch."""
    config = TrainConfig(method=method, options=options, steps=STEPS, save_steps=SAVE, data_size=64)
    with pytest.raises(Interrupted):
        train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True, callbacks=[StopAfterSave()])
    resumed = train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True, resume=True)
    reference = train(config, trainable_base, "builtin:mapping", tmp_path / "ref", quiet=True)
    _assert_same_run(tmp_path / "run", tmp_path / "ref")
    for key in ("eval_loss", "eval_accuracy", "eval_loss_untrained", "train_loss"):
        assert resumed.metrics[key] == reference.metrics[key], key
    if method == "plora":
        assert resumed.metrics["plora_offloads"] == 2  # one before the interruption (replayed), one after
        trained = dict(resumed.model.named_parameters())
        for name, p in reference.model.named_parameters():  # the backbone the offloads went into, too
            assert torch.equal(trained[name], p), name


def test_resume_refusals(trainable_base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = TrainConfig(method="bitfit", steps=4, save_steps=2, eval_steps=2)
    with pytest.raises(InvalidArgument, match=r"nothing to resume: .* holds no complete checkpoint"):
        train(config, trainable_base, "builtin:mapping", run, quiet=True, resume=True)
    train(config, trainable_base, "builtin:mapping", run, quiet=True)
    assert json.loads((run / "run.json").read_text())["save_steps"] == 2
    partial = run / "checkpoint-7"  # cut short: no trainer_state.json, so never resumed from
    partial.mkdir()
    (run / "adapter").rename(tmp_path / "moved")  # as if the run had stopped before writing it
    with pytest.raises(InvalidArgument, match=r"holds checkpoints of an interrupted run: resume it"):
        train(config, trainable_base, "builtin:mapping", run, quiet=True)
    other = TrainConfig(method="bitfit", steps=5, save_steps=2, eval_steps=2)
    with pytest.raises(InvalidArgument, match=r"started with other settings \(steps\)"):
        train(other, trainable_base, "builtin:mapping", run, quiet=True, resume=True)
    with pytest.raises(InvalidArgument, match=r"started with other settings \(data\)"):
        train(config, trainable_base, "builtin:reverse", run, quiet=True, resume=True)
    # stopped after its last checkpoint, before the artifact: the resume trains no further step, and writes it
    finished = train(config, trainable_base, "builtin:mapping", run, quiet=True, resume=True)
    assert finished.metrics["steps"] == 4 and [p[0] for p in finished.curve] == [1, 2, 3, 4]
    assert adapter_tensors(run / "adapter").keys() == adapter_tensors(tmp_path / "moved").keys()
