"""The soak (hotswap.bench.soak): mixed traffic with cancels, deadlines, hot loads, alias moves and a publisher
against a real gRPC server on the tiny base, for ~35 s; and the ``hotswap bench soak`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hotswap.bench import DEFAULT_MODELS, SCENARIOS
from hotswap.bench.soak import History, run_soak
from hotswap.bench.soak_setup import ALIAS_REF, EXPECTED, FAULTS, PUBLISHED, SoakConfig, SoakSetup, prepare
from hotswap.cli import build_parser, main
from hotswap.serve import Engine, Request


def _outputs(setup: SoakSetup, adapters: list[list[str]]) -> list[list[int]]:
    with Engine(setup.base, setup.registry, max_batch=len(adapters), max_resident=len(adapters)) as engine:
        reqs = [Request(prompt_ids=setup.prompts[0], adapters=a, max_new_tokens=12, ignore_eos=True) for a in adapters]
        return [r.token_ids for r in engine.generate(reqs)]


@pytest.mark.slow
def test_soak_survives_faults_and_every_answer_matches_its_solo_run(tiny_base: Path, tmp_path: Path) -> None:
    config = SoakConfig(seconds=35, warmup_s=5)
    setup = prepare(tiny_base, tmp_path, config)
    report = run_soak(setup, config)
    assert report.problems == []
    # statuses: only the expected errors, and each fault really produced its status
    assert set(report.statuses) <= {"OK", *EXPECTED}, report.statuses
    assert report.statuses["CANCELLED"] > 0 and report.statuses["DEADLINE_EXCEEDED"] > 0
    assert not {"internal", "unknown"} & set(report.server_statuses) and report.admin_errors == {}
    assert set(report.faults) == set(FAULTS)
    assert all(n > 0 for n in report.faults.values()), report.faults
    # answers: every completed one checked against its solo run, cut-short ones as prefixes
    assert report.answers_checked == report.completed > 100 and report.prefixes_checked > 0
    assert report.mismatches == report.wrong_versions == 0
    assert set(report.resolved[ALIAS_REF]) == {"tuned@1", "tuned@2"}  # the alias moves took effect mid-traffic
    assert len(report.resolved[PUBLISHED]) > 1  # and so did the publishes
    # the checks can tell the versions apart (else answering from the wrong version would pass)
    outs = _outputs(setup, [[], ["tuned@1"], ["tuned@2"], ["fresh@1"], ["fresh@2"], ["fresh@3"]])
    assert len({tuple(o) for o in outs}) == len(outs)
    # resources
    assert report.leaks and not any(report.leaks.values()), report.leaks
    assert report.rss_growth_mib < config.rss_bound_mib, report.rss_mib
    row = report.row()
    assert row["verdict"] == "pass" and row["err_internal"] == row["err_unknown"] == 0


def test_history_allows_every_version_pointed_to_during_the_request() -> None:
    history = History(1)
    history.moves += [(10.0, 11.0, 2), (20.0, 21.0, 1), (30.0, 31.0, 2)]
    assert history.allowed(12, 19) == {2}
    assert history.allowed(0, 5) == {1}
    assert history.allowed(10.5, 12) == {1, 2}  # submitted while the move was being written
    assert history.allowed(12, 20.5) == {2, 1}
    assert history.allowed(22, 40) == {1, 2}
    assert history.allowed(40, 41) == {2}


def test_bench_soak_flags() -> None:
    assert "soak" in SCENARIOS and DEFAULT_MODELS["soak"] == "tiny"
    args = build_parser().parse_args(["bench", "soak", "--minutes", "0.05"])
    assert args.scenario == "soak" and math.isclose(args.minutes * 60, 3.0) and args.model is None
    assert build_parser().parse_args(["bench", "soak"]).minutes == 5.0
    for bad in ("0", "-1", "nan", "inf", "abc"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "soak", "--minutes", bad])
        assert exc.value.code == 2


@pytest.mark.slow
def test_bench_soak_cli_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "soak", "--minutes", "0.1", "--batch", "4", "--prompt", "8", "--new-tokens", "6",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("| label |") and "| soak 0.1 min |" in out
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["scenario"] == "soak" and data["workload"]["model"] == "tiny"
    assert data["workload"]["soak_seconds"] == pytest.approx(6.0)
    (row,) = data["rows"]
    assert row["verdict"] == "pass", row["problems"]
    assert row["requests"] > 0 and row["answers_checked"] == row["completed"] > 0
    assert row["err_internal"] == row["err_unknown"] == row["mismatches"] == row["leaks"] == 0
    assert {*FAULTS, "rss_before_mib", "rss_after_mib"} <= set(row)
