"""`hotswap eval` and the gated promotion on the tiny base: the engine's eval loss and exact match are training's
own figures for the same held-out data, refs share batches without changing each other's scores, and
`alias --if-better-than` moves an alias only for a better version, recording the comparison with the move.
The same on the real model: tests/test_real_model.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotswap import cli
from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.train import TrainConfig, TrainResult, train
from hotswap.train.evaluation import evaluate_refs, promote_if_better

DATA = "builtin:mapping"


@pytest.fixture(scope="module")
def trained(trainable_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, TrainResult]]:
    """math@1 barely trained (3 steps), math@2 trained (150 steps), both on the mapping task."""
    root = tmp_path_factory.mktemp("eval")
    results = {}
    for version, steps in ((1, 3), (2, 150)):
        config = TrainConfig(method="lora", steps=steps, eval_steps=steps)
        results[version] = train(config, trainable_base, DATA, root / f"v{version}", push="math",
                                 registry=root / "registry", quiet=True)  # fmt: skip
    return root / "registry", results


def test_scores_are_the_trainers_held_out_figures(trainable_base: Path, trained: tuple) -> None:
    """Training evaluates seed 0's held-out draw teacher-forced; hotswap eval scores the same draw through the
    engine: the same loss, and on a one-token task greedy exact match is teacher-forced accuracy."""
    registry, results = trained
    result = evaluate_refs(trainable_base, ["-", "math@1", "math@2"], DATA, registry=registry)
    base, v1, v2 = result.scores
    assert [s.resolved for s in result.scores] == ["base", "math@1", "math@2"]
    for score, metrics in ((v1, results[1].metrics), (v2, results[2].metrics)):
        assert score.eval_loss == pytest.approx(metrics["eval_loss"], abs=1e-4)
        assert score.exact_match == pytest.approx(metrics["eval_accuracy"])
        assert score.examples == 128
    assert base.eval_loss == pytest.approx(results[2].metrics["eval_loss_untrained"], abs=1e-4)
    assert v2.exact_match > 0.9 > base.exact_match
    assert v2.beats(v1) and v2.beats(base) and not base.beats(v2)
    assert len(result.expected) == 3 and all(len(s.answers) == 3 for s in result.scores)


def test_refs_in_one_batch_score_as_they_do_alone(trainable_base: Path, trained: tuple) -> None:
    registry, _ = trained
    together = evaluate_refs(trainable_base, ["math@2", "-"], DATA, registry=registry, max_batch=7).scores
    for score in together:
        (alone,) = evaluate_refs(trainable_base, [score.ref], DATA, registry=registry).scores
        assert alone.eval_loss == pytest.approx(score.eval_loss, abs=1e-5)
        assert alone.exact == score.exact and alone.answers == score.answers


def test_cli_eval_prints_a_table_and_writes_json(
    trainable_base: Path, trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, results = trained
    out = tmp_path / "scores.json"
    code = cli.main(["eval", "-", "math@2", "--base", str(trainable_base), "--data", DATA, "--registry", str(registry),
                     "--json", str(out), "--samples", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "exact match" in printed and "math@2" in printed and "base" in printed
    saved = json.loads(out.read_text())
    assert [s["ref"] for s in saved["scores"]] == ["-", "math@2"]
    assert saved["scores"][1]["eval_loss"] == pytest.approx(results[2].metrics["eval_loss"], abs=1e-4)
    assert saved["digest"].startswith("sha256:") and len(saved["expected"]) == 2


def test_the_gate_promotes_only_a_better_version_and_records_why(trainable_base: Path, trained: tuple) -> None:
    registry_path, _ = trained
    reg = Registry(registry_path)
    # prod unset: the first promotion must beat the base
    first = promote_if_better(reg, "math", "prod", 1, "prod", trainable_base, DATA)
    assert first.incumbent.resolved == "base"
    assert reg.aliases("math").get("prod") == (1 if first.promoted else None)
    reg.set_alias("math", "prod", 1)
    better = promote_if_better(reg, "math", "prod", 2, "prod", trainable_base, DATA)
    assert better.promoted and better.previous == 1 and reg.aliases("math")["prod"] == 2
    entry = reg.alias_history("math")[-1]
    assert (entry["alias"], entry["previous"], entry["version"]) == ("prod", 1, 2)
    record = entry["record"]
    assert record["candidate"]["resolved"] == "math@2" and record["incumbent"]["resolved"] == "math@1"
    assert record["candidate"]["exact"] > record["incumbent"]["exact"]
    assert record["gate"]["data"] == DATA and record["gate"]["digest"].startswith("sha256:")
    assert "beats" in record["summary"]
    # moving prod back to the worse version through the gate is refused and changes nothing
    moves = len(reg.alias_history("math"))
    worse = promote_if_better(reg, "math", "prod", 1, "prod", trainable_base, DATA)
    assert not worse.promoted and reg.aliases("math")["prod"] == 2
    assert len(reg.alias_history("math")) == moves
    assert reg.resolve("math@2").metrics == trained[1][2].manifest.metrics  # the manifest is never rewritten


def test_cli_gate_exit_codes_and_refusals(
    trainable_base: Path, trained: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, _ = trained
    common = ["--eval", DATA, "--base", str(trainable_base), "--registry", str(registry)]
    assert cli.main(["alias", "math", "staging", "2", "--if-better-than", "-", *common]) == 0
    assert "math:staging -> 2" in capsys.readouterr().out
    assert cli.main(["alias", "math", "canary", "1", "--if-better-than", "math@2", *common]) == 1
    out = capsys.readouterr().out
    assert "not promoted" in out and "math:canary unchanged" in out
    assert "canary" not in Registry(registry).aliases("math")
    for args, message in [
        (["alias", "math", "canary", "1", "--if-better-than", "staging", "--registry", str(registry)], "needs --eval"),
        (["alias", "math", "staging", "2", "--if-better-than", "staging", *common], "math@2 is staging already"),
        (["alias", "math", "canary", "--if-better-than", "staging", *common], "give one"),
        (["alias", "math", "canary", "1", "--eval", DATA, "--registry", str(registry)], "go with --if-better-than"),
        (["alias", "math", "canary", "1", "--if-better-than", "", *common], "alias"),
        (["alias", "math", "canary", "2", "--if-better-than", "latest", *common], "math@2 is latest already"),
        (["alias", "math", "Canary!", "1", "--if-better-than", "-", *common], "alias"),
    ]:
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_eval_refusals(trainable_base: Path, trained: tuple) -> None:
    registry, _ = trained
    with pytest.raises(InvalidArgument, match="refs must differ"):
        evaluate_refs(trainable_base, ["-", "-"], DATA, registry=registry)
    with pytest.raises(InvalidArgument, match="at least one ref"):
        evaluate_refs(trainable_base, [], DATA, registry=registry)
    with pytest.raises(InvalidArgument, match="samples must be >= 0"):
        evaluate_refs(trainable_base, ["-"], DATA, registry=registry, samples=-1)
