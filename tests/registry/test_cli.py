"""The CLI: happy paths print what a user needs; every error is one line and a distinct exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hotswap.basemodel import fingerprint
from hotswap.cli import main
from hotswap.registry import Registry
from hotswap.train import RandomLoraConfig, random_lora

MakeArtifact = Callable[..., Path]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str) -> None:
    assert err.startswith("hotswap: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_push_list_versions_show_alias_pull(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make_artifact: MakeArtifact
) -> None:
    reg = str(tmp_path / "reg")
    push = ("--registry", reg, "push", "--no-base")  # registry-only artifacts: no base to check them against
    code, out, _ = run(capsys, *push, str(make_artifact()), "--name", "math", "--alias", "prod")
    assert code == 0 and "published math@1" in out and "prod" in out
    assert run(capsys, *push, str(make_artifact(seed=1)), "--name", "math")[0] == 0
    code, out, _ = run(capsys, "--registry", reg, "list")
    assert code == 0 and "math" in out and "prod=1" in out
    code, out, _ = run(capsys, "--registry", reg, "versions", "math")
    assert code == 0 and out.count("lora") == 2
    code, out, _ = run(capsys, "--registry", reg, "show", "math:prod")
    fields = dict(line.split(None, 1) for line in out.splitlines() if line and not line.startswith(("-", " ")))
    assert code == 0 and fields["version"] == "1" and fields["aliases"] == "prod" and fields["method"] == "lora"
    assert "adapter_model.safetensors" in out
    code, out, _ = run(capsys, "--registry", reg, "show", "math", "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    code, out, _ = run(capsys, "--registry", reg, "alias", "math", "prod", "2")
    assert code == 0 and "math:prod -> 2 (was 1)" in out
    code, out, _ = run(capsys, "--registry", reg, "pull", "math:prod", "--to", str(tmp_path / "copy"))
    assert code == 0 and (tmp_path / "copy" / "manifest.json").is_file()
    code, out, _ = run(capsys, "--registry", reg, "list", "--json")
    assert json.loads(out)[0]["aliases"] == {"prod": 2}


def test_errors_are_one_line_with_exit_codes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make_artifact: MakeArtifact
) -> None:
    reg = str(tmp_path / "reg")
    run(capsys, "--registry", reg, "push", "--no-base", str(make_artifact()), "--name", "math")

    code, _, err = run(capsys, "--registry", reg, "show", "../etc")
    assert code == 2
    assert_one_line_error(err)
    code, _, err = run(capsys, "--registry", reg, "show", "ghost")
    assert code == 3 and "ghost" in err
    assert_one_line_error(err)
    code, _, err = run(capsys, "--registry", reg, "alias", "math", "prod")
    assert code == 2
    assert_one_line_error(err)

    pickled = make_artifact()
    (pickled / "extra.pt").write_bytes(b"\x80\x04x")
    code, _, err = run(capsys, "--registry", reg, "push", "--no-base", str(pickled), "--name", "math")
    assert code == 2 and "pickle" in err
    assert_one_line_error(err)

    stored = Registry(reg).fetch("math")[1] / "adapter_model.safetensors"
    os.chmod(stored, 0o644)
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    code, _, err = run(capsys, "--registry", reg, "pull", "math", "--to", str(tmp_path / "x"))
    assert code == 5 and "sha256" in err
    assert_one_line_error(err)


def test_console_entry_point_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hotswap.cli", "--registry", str(tmp_path), "show", "ghost"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert proc.stderr.startswith("hotswap: error:") and "Traceback" not in proc.stderr


def test_push_needs_a_base(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make_artifact: MakeArtifact, tiny_base: Path
) -> None:
    """Without --base, push takes the base the adapter's config names (PEFT's base_model_name_or_path) if it is a
    local checkpoint; else it refuses in one line, unless --no-base asks for a registry-only version."""
    reg = str(tmp_path / "reg")
    code, _, err = run(capsys, "--registry", reg, "push", str(make_artifact()), "--name", "math")
    assert code == 2 and "names no base" in err and "--base PATH" in err and "--no-base" in err
    assert_one_line_error(err)
    hub_base = make_artifact(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    code, _, err = run(capsys, "--registry", reg, "push", str(hub_base), "--name", "math")
    assert code == 2 and "'HuggingFaceTB/SmolLM2-135M', which is not a checkpoint directory here" in err
    assert_one_line_error(err)
    assert Registry(reg).list() == []  # nothing written

    lora = random_lora(tiny_base, tmp_path / "lora", RandomLoraConfig(rank=4))  # its config names tiny_base
    code, out, _ = run(capsys, "--registry", reg, "push", str(lora), "--name", "math")
    assert code == 0 and "published math@1" in out
    assert Registry(reg).resolve("math@1").base_fingerprint == fingerprint(tiny_base)
    code, _, err = run(capsys, "--registry", reg, "push", str(make_artifact()), "--name", "math", "--base",
                       str(tiny_base))  # fmt: skip
    # checked against the given base: a lone lora_A is refused (earlier lines: transformers' bar, in-process only)
    assert code == 16 and err.splitlines()[-1].startswith("hotswap: error: ") and "lora_B" in err
    with pytest.raises(SystemExit) as exit_:
        main(["--registry", reg, "push", str(lora), "--name", "math", "--base", str(tiny_base), "--no-base"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_alias_history(capsys: pytest.CaptureFixture[str], tmp_path: Path, make_artifact: MakeArtifact) -> None:
    reg = str(tmp_path / "reg")
    push = ("--registry", reg, "push", "--no-base")
    run(capsys, *push, str(make_artifact()), "--name", "math", "--alias", "prod")
    run(capsys, *push, str(make_artifact(seed=1)), "--name", "math")
    run(capsys, *push, str(make_artifact(seed=2)), "--name", "fresh")
    code, out, _ = run(capsys, "--registry", reg, "alias", "fresh", "--history")
    assert code == 0 and out == "no alias moves recorded for fresh\n"
    evaluation = {"summary": "v2 beats v1: 0.71 > 0.64", "candidate": 0.71, "incumbent": 0.64}
    Registry(reg).set_alias("math", "prod", 2, record=evaluation)  # a gated promotion, through the API
    Registry(reg).set_alias("math", "canary", 1, record={"why": "x" * 100})  # no summary: its JSON, cut short
    assert run(capsys, "--registry", reg, "alias", "math", "canary", "--delete")[0] == 0

    code, out, _ = run(capsys, "--registry", reg, "alias", "math", "--history")
    header, rule, *rows = out.splitlines()
    assert code == 0 and header.split() == ["at", "alias", "move", "record"] and set(rule) <= {"-", " "}
    cells = [row.split("  ", 1)[1].split() for row in rows]  # after the timestamp
    assert [c[:4] for c in cells] == [
        ["prod", "-", "->", "1"],
        ["prod", "1", "->", "2"],
        ["canary", "-", "->", "1"],
        ["canary", "1", "->", "deleted"],
    ]
    assert rows[1].endswith("v2 beats v1: 0.71 > 0.64") and rows[0].endswith("-")
    assert '{"why":"xxx' in rows[2] and rows[2].endswith("…") and len(rows[2]) < 120
    assert all(row[:4].isdigit() and "+00:00" in row for row in rows)  # ISO 8601 UTC

    code, out, _ = run(capsys, "--registry", reg, "alias", "math", "prod", "--history")  # one alias's moves
    assert code == 0 and len(out.splitlines()) == 4 and "canary" not in out
    code, out, _ = run(capsys, "--registry", reg, "alias", "math", "--history", "--json")
    assert code == 0 and json.loads(out)[1]["record"] == evaluation

    # moving and deleting print what they did before: unchanged
    code, out, _ = run(capsys, "--registry", reg, "alias", "math", "prod", "1")
    assert code == 0 and out == "math:prod -> 1 (was 2)\n"
    for argv, exit_code in [
        (("alias", "math", "prod", "2", "--history"), 2),
        (("alias", "math", "prod", "--delete", "--history"), 2),
        (("alias", "math", "latest", "--history"), 2),
        (("alias", "math"), 2),
        (("alias", "math", "prod", "2", "--json"), 2),
        (("alias", "ghost", "--history"), 3),
    ]:
        code, _, err = run(capsys, "--registry", reg, *argv)
        assert code == exit_code, argv
        assert_one_line_error(err)
    assert Registry(reg).aliases("math") == {"prod": 1}
