"""`hotswap bench server --api http` at a tiny workload: the OpenAI-compatible API's row beside gRPC's, from the same
run (no speed assertions)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hotswap.bench import run
from tests.bench.test_bench import TINY

pytest.importorskip("openai")


@pytest.mark.slow
def test_server_http_row_beside_grpc(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    path, table = run("server", replace(TINY, api="http"), tmp_path, tmp_path_factory.mktemp("cache"), [2])
    rows = json.loads(path.read_text())["rows"]
    grpc, http, *per_adapter = rows
    assert (grpc["api"], http["api"]) == ("grpc", "http") and grpc["engine_tok_s"] == http["engine_tok_s"]
    for row in (grpc, http):
        assert row["vs_engine"] == pytest.approx(row["tok_s"] / row["engine_tok_s"])
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p95"] and 0 < row["itl_ms_p50"] <= row["itl_ms_p95"]
    assert [(r["label"], r["api"]) for r in per_adapter] == [
        (f"adapter lora-{i}", api) for api in ("grpc", "http") for i in range(2)
    ]
    assert "| http |" in table
