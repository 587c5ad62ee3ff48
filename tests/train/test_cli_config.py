"""`hotswap train`'s flags are generated from ``TrainConfig``: every field is a flag, its help the field's, and a
flag not given leaves the dataclass's default, so the two cannot drift."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hotswap.cli import build_parser
from hotswap.cli.train import train_config
from hotswap.train import TrainConfig, trainable_methods

REQUIRED = ["train", "--method", "lora", "--base", "b", "--data", "builtin:mapping"]
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.parse_args(REQUIRED)  # adds the deferred flags
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _config(*flags: str) -> TrainConfig:
    return train_config(build_parser().parse_args([*REQUIRED, *flags]))


def test_every_field_is_a_flag_defaulting_to_the_dataclass() -> None:
    actions = {a.dest: a for a in _train_parser()._actions}
    option_fields = {f.name for spec in trainable_methods().values() for f in dataclasses.fields(spec.options)}
    assert {f"method_option.{name}" for name in option_fields} <= set(actions)  # TrainConfig.options
    assert actions["method"].required
    for name in FIELDS.keys() - {"method", "options"}:
        assert name in actions, name
        assert actions[name].default is argparse.SUPPRESS, name  # the CLI holds no default of its own
    assert _config() == TrainConfig(method="lora")  # every field not given: the dataclass's default


def test_flags_reach_their_fields() -> None:
    config = _config(
        "--steps", "7", "--lr", "0.5", "--batch-size", "3", "--gradient-accumulation-steps", "2",
        "--lr-scheduler", "cosine", "--warmup-ratio", "0.1", "--weight-decay", "0.01", "--max-grad-norm", "0.5",
        "--bf16", "--seed", "3", "--eval-every", "4", "--save-steps", "5", "--report-to", "tensorboard,wandb",
        "--data-size", "9", "--device", "cuda", "--gradient-checkpointing", "--dtype", "bfloat16",
        "--fsdp", "full_shard", "--rank", "4",
    )  # fmt: skip
    assert config == TrainConfig(
        method="lora", options={"rank": 4}, steps=7, lr=0.5, batch_size=3, gradient_accumulation_steps=2,
        lr_scheduler="cosine", warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5, bf16=True, seed=3,
        eval_steps=4, save_steps=5, report_to=("tensorboard", "wandb"), data_size=9, device="cuda",
        gradient_checkpointing=True, dtype="bfloat16", fsdp="full_shard",
    )  # fmt: skip
    assert _config("--epochs", "2", "--deepspeed", "ds.json", "--report-to", "none") == TrainConfig(
        method="lora", epochs=2.0, deepspeed="ds.json"
    )


def test_help_shows_each_fields_help_and_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping inside the texts
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    actions = {a.dest: a for a in _train_parser()._actions}
    for f in FIELDS.values():
        assert " ".join(f.metadata["help"].split()) in shown, f.name  # method's: --method; options': a group title
        if f.name in ("method", "options", "report_to"):  # not generated from the field alone
            continue
        hidden = f.default is None or f.default is False or f.default == ""
        assert actions[f.name].help == f.metadata["help"] + ("" if hidden else f" (default: {f.default})"), f.name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["--eval-every", "x"], "argument --eval-steps/--eval-every: expected a positive integer, got 'x'"),
        (["--lr-scheduler", "step"], "argument --lr-scheduler: invalid choice: 'step'"),
    ],
)
def test_flag_values_are_checked_while_parsing(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*REQUIRED, *flags])
    assert message in capsys.readouterr().err
