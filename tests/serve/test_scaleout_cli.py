"""`hotswap serve --ray` as a process: it starts a local Ray, deploys, serves `hotswap generate` unchanged,
and deletes its application on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hotswap import cli
from hotswap.basemodel import fingerprint
from hotswap.registry import Registry
from hotswap.train import RandomLoraConfig, random_lora
from tests.serve.serverutil import free_port

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def test_serve_ray_process(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(tmp_path / "registry")
    reg.publish(random_lora(tiny_base, tmp_path / "math", RandomLoraConfig(rank=4, init_std=0.3)), "math",
                base_fingerprint=fingerprint(tiny_base))  # fmt: skip
    port = free_port()
    argv = [sys.executable, "-m", "hotswap.cli", "--registry", str(tmp_path / "registry"), "serve", "--ray",
            "--replicas", "1", "--replica-cpus", "0.5", "--base", str(tiny_base), "--no-auth", "--port", str(port),
            "--ray-http-port", str(free_port()), "--max-seq-len", "128"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "on Ray Serve, 1 replicas, gRPC proxy port" in line, line + proc.stderr.read()  # type: ignore[union-attr]
        server = f"127.0.0.1:{port}"
        assert cli.main(["generate", "--server", server, "--adapter", "math", "--prompt-ids", "5,17,99",
                         "--max-new-tokens", "3", "--json"]) == 0  # fmt: skip
        out = capsys.readouterr().out
        assert '"finish_reason": "length"' in out and '"math@1"' in out
        assert cli.main(["generate", "--server", server, "--adapter", "nope", "--prompt-ids", "1"]) != 0
        assert "nope" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "shutting down" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
