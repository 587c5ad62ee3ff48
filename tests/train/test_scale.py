"""Training at scale on one process: gradient accumulation k x b is batch k·b, bf16 mixed precision trains and its
artifact loads in PEFT, schedules / warmup / weight decay reach Trainer's optimizer, reporting to TensorBoard writes
its event files, `--quiet` silences transformers' own bars, and what cannot run is refused in one line."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from hotswap.basemodel import load_model
from hotswap.cli import main
from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.train import TrainConfig, train
from tests.train.artifacts import adapter_tensors, assert_same_training

PROBE = torch.tensor([[5, 12, 30, 11], [7, 8, 9, 10]])


class Logs(TrainerCallback):
    """What Trainer logged, and the optimizer's parameter groups at the start."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.groups: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.groups = [{"weight_decay": g["weight_decay"], "params": g["params"]} for g in optimizer.param_groups]

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        self.logs.append({**(logs or {}), "step": state.global_step})

    def series(self, key: str) -> list[float]:
        return [entry[key] for entry in self.logs if key in entry]


@pytest.mark.parametrize(
    ("method", "options"), [("lora", {}), ("dylora", {}), ("child-tuning", {"variant": "f", "density": 0.3})]
)
def test_gradient_accumulation_matches_the_big_batch(
    method: str, options: dict, trainable_base: Path, tmp_path: Path
) -> None:
    """4 micro-batches of 4 per step = one batch of 16: the same examples per step, the loss normalised over the
    whole step's tokens, DyLoRA's rank and Child-tuning's mask drawn once per step (fp32)."""
    results = {}
    for k, batch in ((1, 16), (4, 4)):
        config = TrainConfig(method=method, options=options, steps=6, eval_steps=3, batch_size=batch,
                             gradient_accumulation_steps=k)  # fmt: skip
        results[k] = train(config, trainable_base, "builtin:mapping", tmp_path / str(k), quiet=True)
    big, accumulated = results[1], results[4]
    assert [p[1] for p in accumulated.curve] == pytest.approx([p[1] for p in big.curve], rel=1e-5)
    assert accumulated.metrics["eval_loss"] == pytest.approx(big.metrics["eval_loss"], rel=1e-5)
    assert_same_training(accumulated.artifact, big.artifact)


def test_gradient_accumulation_adds_the_penalty_once_per_step(trainable_base: Path, tmp_path: Path) -> None:
    """AdaLoRA's orthogonality penalty: logged beside the task loss, not in it, and the same per optimizer step
    whether the step is one batch or four micro-batches (the steps before AdaLoRA's first budget cut: over 10
    steps, it cuts after the second)."""
    logs = {}
    for k, batch in ((1, 16), (4, 4)):
        logs[k] = Logs()
        config = TrainConfig(method="adalora", steps=10, eval_steps=10, batch_size=batch, gradient_accumulation_steps=k)
        train(config, trainable_base, "builtin:mapping", tmp_path / str(k), quiet=True, callbacks=[logs[k]])
    for key in ("loss", "penalty"):
        assert logs[4].series(key)[:2] == pytest.approx(logs[1].series(key)[:2], rel=1e-5), key
    assert all(p > 0 for p in logs[1].series("penalty"))


def test_bf16_mixed_precision_trains_and_peft_loads_it(trainable_base: Path, tmp_path: Path) -> None:
    config = TrainConfig(method="lora", steps=30, eval_steps=30, bf16=True)
    result = train(config, trainable_base, "builtin:mapping", tmp_path / "run", push="half", registry=tmp_path / "reg",
                   quiet=True)  # fmt: skip
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_untrained"] - 1.0, result.metrics
    assert {t.dtype for t in adapter_tensors(result.artifact).values()} == {torch.float32}
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}  # autocast computes in bf16; weights stay
    loaded = PeftModel.from_pretrained(load_model(trainable_base), result.artifact).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=PROBE).logits, result.model(input_ids=PROBE).logits, rtol=0,
                                   atol=0)  # fmt: skip
    recorded = Registry(tmp_path / "reg").resolve("half").lineage.training_config
    assert recorded["precision"] == "bf16" and recorded["dtype"] == "float32"
    assert recorded["world_size"] == 1 and recorded["effective_batch_size"] == 16


@pytest.mark.parametrize(
    ("scheduler", "warmup", "shape"),
    [("cosine", 0.2, "warm-decay"), ("linear", 0.0, "decay"), ("constant", 0.0, "flat"), ("constant", 0.5, "warm")],
)
def test_schedules_and_warmup_reach_the_optimizer(
    scheduler: str, warmup: float, shape: str, trainable_base: Path, tmp_path: Path
) -> None:
    logs = Logs()
    config = TrainConfig(method="bitfit", steps=10, eval_steps=10, lr=0.01, lr_scheduler=scheduler,
                         warmup_ratio=warmup)  # fmt: skip
    train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True, callbacks=[logs])
    lr = logs.series("learning_rate")  # the rate of each step, in order
    assert len(lr) == 10 and max(lr) == pytest.approx(0.01)
    rising = [b > a for a, b in itertools.pairwise(lr)]
    if shape == "flat":
        assert lr == pytest.approx([0.01] * 10)
    elif shape == "decay":
        assert lr[0] == pytest.approx(0.01) and not any(rising) and lr[-1] == pytest.approx(0.001)
    elif shape == "warm-decay":  # 2 warmup steps from 0, then a half cosine down
        assert lr[0] == 0 and rising[:2] == [True, True] and not any(rising[2:]) and lr[-1] < 0.001
    else:  # warm up for 5 steps, then constant
        assert lr[0] == 0 and all(rising[:5]) and lr[5:] == pytest.approx([0.01] * 5)


def test_weight_decay_reaches_the_optimizer_but_not_biases(trainable_base: Path, tmp_path: Path) -> None:
    logs = Logs()
    config = TrainConfig(method="bottleneck", steps=1, eval_steps=1, weight_decay=0.1, max_grad_norm=0.5)
    result = train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True, callbacks=[logs])
    names = {id(p): n for n, p in result.model.named_parameters()}
    decayed = {names[id(p)] for g in logs.groups if g["weight_decay"] == 0.1 for p in g["params"]}
    kept = {names[id(p)] for g in logs.groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and all(n.endswith(".weight") for n in decayed)
    assert kept and all(n.endswith(".bias") for n in kept)
    assert logs.series("grad_norm")  # clipping sees the norm


def test_report_to_tensorboard_writes_event_files(trainable_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    config = TrainConfig(method="bitfit", steps=2, eval_steps=1, report_to=("tensorboard",))
    train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True)
    events = list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_quiet_silences_transformers_bars(
    trainable_base: Path, trainable_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Proxy-tuning loads a small model and writes two (transformers' loading and shard-writing bars)."""
    args = ["train", "--method", "proxy", "--small-model", str(trainable_small), "--base", str(trainable_base),
            "--data", "builtin:mapping", "--steps", "2", "--eval-steps", "2"]  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "trained proxy" in captured.out
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err, captured.err


REFUSED = [
    ({"fp16": True}, r"^fp16 mixed precision needs a CUDA device"),
    ({"bf16": True, "dtype": "float16"}, r"^bf16 mixed precision over a float16 base"),
    ({"report_to": ("nonsense",)}, r"^report_to: unknown integration 'nonsense'"),
    ({"device": "cuda:1"}, r"^device 'cuda:1'|^device cuda:1"),
    ({"fsdp": "full_shard auto_wrap"}, r"^cannot train with these settings: .*fsdp|^fsdp: Trainer did not shard"),
]


@pytest.mark.parametrize(("fields", "message"), REFUSED)
def test_runs_the_device_cannot_do_are_refused(
    fields: dict, message: str, trainable_base: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        train(TrainConfig(method="lora", steps=1, **fields), trainable_base, "builtin:mapping", tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()


CONFIG_REFUSED = [
    ({"method": "fishmask", "weight_decay": 0.01}, r"^fishmask trains a masked part .* weight_decay 0$"),
    ({"method": "bitfit", "deepspeed": "ds.json"}, r"^bitfit keeps training state of its own .* \(torchrun\) inst"),
    ({"method": "plora", "fsdp": "full_shard"}, r"^plora keeps training state of its own"),
    ({"method": "lora", "deepspeed": "ds.json", "fsdp": "full_shard"}, r"^deepspeed and fsdp are two ways to shard"),
    ({"method": "lora", "bf16": True, "fp16": True}, r"^bf16 and fp16 are two mixed precisions"),
    ({"method": "lora", "lr_scheduler": "step"}, r"^lr_scheduler must be one of linear, cosine, constant"),
    ({"method": "lora", "warmup_ratio": 1.0}, r"^warmup_ratio must be in \[0, 1\)"),
    ({"method": "lora", "gradient_accumulation_steps": 0}, r"^gradient_accumulation_steps must be >= 1"),
    ({"method": "lora", "max_grad_norm": -1.0}, r"^weight_decay and max_grad_norm must be >= 0"),
    ({"method": "lora", "weight_decay": float("nan")}, r"^weight_decay must be a finite number, got nan$"),
    ({"method": "lora", "max_grad_norm": float("inf")}, r"^max_grad_norm must be a finite number, got inf$"),
    ({"method": "lora", "lr": float("inf")}, r"^lr must be a finite number, got inf$"),
    ({"method": "lora", "epochs": float("inf")}, r"^epochs must be a finite number, got inf$"),
    ({"method": "lora", "warmup_ratio": float("nan")}, r"^warmup_ratio must be a finite number, got nan$"),
]


@pytest.mark.parametrize(("fields", "message"), CONFIG_REFUSED)
def test_config_refusals(fields: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        TrainConfig(**fields)


def test_cli_refuses_in_one_line(trainable_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--method", "fishmask", "--base", str(trainable_base), "--data", "builtin:mapping", "--out",
            str(tmp_path / "run"), "--quiet"]  # fmt: skip
    assert main([*args, "--weight-decay", "0.1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("hotswap: error: fishmask trains a masked")
    assert main([*args, "--report-to", "wandb,tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hotswap: error: report_to") and "unknown" not in err
