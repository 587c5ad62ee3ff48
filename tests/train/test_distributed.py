"""Data parallelism through the standard launchers, on CPU (gloo): `torchrun --nproc-per-node 2 -m hotswap train`
and `accelerate launch --multi_gpu --num_processes 2 -m hotswap train` with 8 examples per process train what one
process does with 16 (curve, eval and adapter within float tolerance), and only the first process writes the
artifact and publishes, once. The methods with step behaviour of their own
(DyLoRA's rank, PLoRA's offload, Child-tuning's per-step mask) agree across the processes too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotswap.registry import Registry
from hotswap.train import TrainConfig, train
from tests.serve.serverutil import free_port
from tests.train.artifacts import assert_same_training

STEPS = 8


# the two standard launchers, two CPU processes each (gloo); accelerate's own CPU mode (--cpu) starts one process
# unless given an MPI hostfile, and its --multi_gpu launcher is torchrun's, which starts CPU processes too
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}  # fmt: skip


def _launch(*args: str, launcher: str = "torchrun") -> subprocess.CompletedProcess[str]:
    port = [] if launcher == "torchrun" else ["--main_process_port", str(free_port())]  # torchrun: --standalone
    cmd = [*LAUNCHERS[launcher], *port, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _assert_close_runs(dp: Path, single: Path) -> None:
    assert_same_training(dp / "adapter", single / "adapter")
    rows, ref = _curve(dp), _curve(single)
    assert len(rows) == len(ref) == STEPS
    for got_row, want_row in zip(rows, ref, strict=True):
        assert got_row == pytest.approx(want_row, rel=1e-5, nan_ok=True)


def _curve(run: Path) -> list[list[float]]:
    """loss_curve.csv's rows: step, train loss, eval loss (NaN between evaluations)."""
    lines = (run / "loss_curve.csv").read_text().split()[1:]
    return [[float(v or "nan") for v in line.split(",")] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_two_processes_match_one_and_publish_once(launcher: str, trainable_base: Path, tmp_path: Path) -> None:
    """`torchrun ... -m hotswap train` and `accelerate launch ... -m hotswap train`."""
    reg = tmp_path / "registry"
    args = ["-m", "hotswap", "--registry", str(reg), "train", "--method", "lora", "--base", str(trainable_base),
            "--data", "builtin:mapping", "--steps", str(STEPS), "--eval-steps", "4", "--batch-size", "8", "--out",
            str(tmp_path / "dp"), "--quiet", "--push", "math"]  # fmt: skip
    done = _launch(*args, launcher=launcher)
    assert done.stdout.count("trained lora") == 1 and done.stdout.count("published math@1") == 1, done.stdout
    single = TrainConfig(method="lora", steps=STEPS, eval_steps=4, batch_size=16)
    train(single, trainable_base, "builtin:mapping", tmp_path / "single", quiet=True)
    _assert_close_runs(tmp_path / "dp", tmp_path / "single")
    versions = Registry(reg).versions("math")
    assert [v.version for v in versions] == [1]
    recorded = versions[0].lineage.training_config
    assert recorded["world_size"] == 2 and recorded["effective_batch_size"] == 16 and recorded["batch_size"] == 8


DP_RUNS = """
import json, sys
from hotswap.train import TrainConfig, train

for method, options in json.loads(sys.argv[1]):
    config = TrainConfig(method=method, options=options, steps={steps}, eval_steps=4, batch_size=8)
    result = train(config, sys.argv[2], "builtin:mapping", f"{{sys.argv[3]}}/{{method}}", quiet=True)
    assert result.primary == (int(__import__("os").environ["RANK"]) == 0)
"""

METHODS = [["dylora", {}], ["plora", {"period": 3}], ["child-tuning", {"variant": "f", "density": 0.3}]]


@pytest.mark.slow
def test_methods_with_step_behaviour_agree_across_processes(trainable_base: Path, tmp_path: Path) -> None:
    script = tmp_path / "dp_runs.py"
    script.write_text(DP_RUNS.format(steps=STEPS))
    _launch(str(script), json.dumps(METHODS), str(trainable_base), str(tmp_path / "dp"))
    for method, options in METHODS:
        config = TrainConfig(method=method, options=options, steps=STEPS, eval_steps=4, batch_size=16)
        train(config, trainable_base, "builtin:mapping", tmp_path / "single" / method, quiet=True)
        _assert_close_runs(tmp_path / "dp" / method, tmp_path / "single" / method)
