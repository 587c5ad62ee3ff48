"""``hotswap bench kv`` at a tiny scale: its three parts run side by side and measure what they say (no speed
assertions: rows at once and prefix-cache hits are counts, not timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotswap.bench import SCENARIOS, kv, run
from hotswap.bench.common import Workload
from hotswap.cli.bench import SCENARIO_NAMES


def test_the_cli_names_every_scenario() -> None:
    assert tuple(SCENARIOS) == SCENARIO_NAMES


def test_kv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LONGEST": 96,
        "CONCURRENT_REQUESTS": 12,
        "SYSTEM_LEN": 40,
        "DECODING_ROWS": 3,
        "CHUNK": 16,
    }.items():
        monkeypatch.setattr(kv, name, value)
    workload = Workload(model="tiny", prompt=8, new_tokens=4, repeats=1, dtype="float32")
    path, table = run("kv", workload, tmp_path / "out", tmp_path / "cache", [2])
    rows = {r["label"]: r for r in json.loads(path.read_text())["rows"]}
    static, paged = rows["concurrency: static cache"], rows["concurrency: paged cache"]
    assert static["kv_bytes"] == paged["kv_bytes"] and static["max_rows"] == kv.STATIC_ROWS
    assert paged["max_rows"] > static["max_rows"] and paged["rows_vs_static"] == paged["max_rows"] / static["max_rows"]
    cold, cached = rows["prefix reuse: no prefix cache"], rows["prefix reuse: prefix cache"]
    assert cold["hit_tokens_per_prompt_token"] == 0
    # every key is asked thrice: twice with its 40-token system prompt cached (two blocks of 16), of 72 tokens
    assert cached["hit_tokens_per_prompt_token"] == pytest.approx(2 / 3 * 32 / 72)
    assert "inter_token_p95_vs_whole" in rows["chunked prefill: chunks of 16"]
    assert "| prefix reuse: prefix cache |" in table
