"""Operating the server: `hotswap serve` as a process (config file, SIGTERM drain), the `generate` and
`health` commands, and a bounded load test."""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotswap import cli
from hotswap.client import Client
from hotswap.errors import ServerUnavailable
from hotswap.serve.api.server import Server
from tests.serve.serverutil import ACME, PROMPT, client, make_server, scrape, wait_idle


def test_sigterm_drains_and_exits_zero(text_base: Path, server_registry: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f'base = "{text_base}"\nregistry = "{server_registry}"\nno_auth = true\nport = 0\nmetrics_port = 0\n'
        "grace = 120\nmax_batch = 2\nmax_seq_len = 2048\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "hotswap.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        assert match, line + proc.stderr.read()  # type: ignore[union-attr]
        c = Client(f"127.0.0.1:{match.group(1)}", timeout=60)
        watch = health_pb2_grpc.HealthStub(c.channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        # two requests in flight keep the drain busy; both have streamed a token, so both reached the server
        streams = [c.stream(PROMPT, adapters=["math"], max_new_tokens=400, ignore_eos=True) for _ in range(2)]
        firsts = [next(iter(s)) for s in streams]
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # pushed as the drain starts
        with pytest.raises(ServerUnavailable, match="shutting down"):
            c.generate(PROMPT)
        for first, stream in zip(firsts, streams, strict=True):  # the in-flight requests run to the end
            assert len(first.token_ids) + sum(len(ch.token_ids) for ch in stream) == 400
        assert all(s.response is not None and s.response.finish_reason == "length" for s in streams)
        assert proc.wait(timeout=60) == 0
        out, err = proc.communicate()
        assert "shutting down" in out
        assert re.search(r"GenerateStream adapter=math@1 status=ok prompt_tokens=\d+ tokens=400 finish=length", err)
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str], text_base: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "x"\nmax_batchh = 3\n')
    assert cli.main(["serve", "--config", str(bad), "--no-auth"]) == 2
    assert "unknown keys ['max_batchh']" in capsys.readouterr().err
    assert cli.main(["serve", "--base", str(text_base), "--port", "0"]) == 2
    assert "--no-auth" in capsys.readouterr().err
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\ntoken = "t"\nrole = "user"\n')
    assert cli.main(["serve", "--base", str(text_base), "--auth", str(tokens), "--port", "0"]) == 2
    assert "needs a tenant" in capsys.readouterr().err


def test_generate_and_health_commands(
    server: Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = f"127.0.0.1:{server.port}"
    monkeypatch.setenv("HOTSWAP_TOKEN", ACME)
    expected = client(server).generate(PROMPT, adapters=["math"], max_new_tokens=5, ignore_eos=True)
    assert cli.main(["generate", "--server", target, "--adapter", "math", "--max-new-tokens", "5", PROMPT]) == 0
    out = capsys.readouterr().out
    assert out == expected.text + "\n"  # greedy: the same text as the Python client got
    args = ["generate", "--server", target, "--adapter", "math", "--max-new-tokens", "5", "--json"]
    assert cli.main([*args, PROMPT]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapters"] == [["math@1", 1.0]] and data["token_ids"] == expected.token_ids
    assert cli.main([*args, "--stream", PROMPT]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == data["text"]
    assert cli.main([*args, "--prompt-ids", "101,2000,3000"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 3
    assert cli.main(["generate", "--server", target, "--adapter", "nope", PROMPT]) == 3
    err = capsys.readouterr().err
    assert err.startswith("hotswap: error: adapter 'nope'") and err.count("\n") == 1
    assert cli.main(["generate", "--server", target, "--adapter", "globex/secret", PROMPT]) == 12
    assert cli.main(["generate", "--server", target, "--token", "bad", PROMPT]) == 11
    capsys.readouterr()
    assert cli.main(["health", "--server", target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli.main(["health", "--server", "127.0.0.1:1", "--timeout", "2"]) == 15


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.slow
def test_load_32_streaming_clients(text_base: Path, server_registry: Path) -> None:
    """32 concurrent streaming clients over 4 adapters for 3 rounds of ~4 s: no errors, no memory growth."""
    srv = make_server(text_base, server_registry, max_batch=32, max_queue=64, max_seq_len=256).start()
    adapters = [["math"], ["acme/tone"], ["acme/shared"], []]
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def worker(i: int, until: float) -> None:
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            while time.monotonic() < until:
                try:
                    stream = c.stream(PROMPT, adapters=adapters[i % 4], max_new_tokens=16, ignore_eos=True)
                    n = sum(len(ch.token_ids) for ch in stream)
                    assert n == 16 and stream.response is not None
                    with lock:
                        done[0] += 1
                except BaseException as e:
                    errors.append(e)
                    return

    rss = []
    try:
        for _ in range(3):
            until = time.monotonic() + 4
            threads = [threading.Thread(target=worker, args=(i, until)) for i in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            wait_idle(srv)
            rss.append(_rss_mb())
        assert not errors, errors[:3]
        assert done[0] >= 96
        m = scrape(srv)
        total = sum(v for (name, labels), v in m.items() if name == "hotswap_requests_total")
        assert total == done[0]
        assert rss[2] - rss[0] < 64, rss  # warm after round 1: later rounds must not keep growing
    finally:
        srv.stop(grace=1)
