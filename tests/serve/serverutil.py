"""Helpers of the server tests: start a small server, a client for it, scrape its /metrics."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from hotswap.client import Client
from hotswap.serve import EngineConfig
from hotswap.serve.api.config import ServerConfig
from hotswap.serve.api.server import Server

ACME, GLOBEX, ADMIN = "acme-secret-token", "globex-secret-token", "admin-secret-token"
PROMPT = "the quick brown fox"


def make_server(base: Path, registry: Path, auth: Path | None = None, **engine: object) -> Server:
    limits = {"max_batch": 8, "max_seq_len": 256, "max_queue": 64, **engine}
    config = ServerConfig(
        base=base,
        registry=str(registry),
        port=0,
        metrics_port=0,
        auth=auth,
        no_auth=auth is None,
        grace_seconds=5,
        engine=EngineConfig(**limits),  # type: ignore[arg-type]
    )
    return Server(config)


def client(srv: Server, token: str | None = ACME, **kw: object) -> Client:
    return Client(f"127.0.0.1:{srv.port}", token=token, timeout=60, **kw)  # type: ignore[arg-type]


def scrape(srv: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics as {(name, sorted labels): value}, fetched over HTTP."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_idle(srv: Server, timeout: float = 30) -> None:
    """Until the engine has no waiting or running request and every RPC has finished (polls; the bound
    only guards against a hang)."""
    assert srv.engine is not None
    end = time.monotonic() + timeout
    while srv.engine.counts() != (0, 0) or srv.inflight:
        assert time.monotonic() < end, f"busy: {srv.engine.counts()}, {srv.inflight} RPCs"
        time.sleep(0.01)


def free_port() -> int:
    """A port free on 127.0.0.1 now (for servers started by another process, which cannot be told 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_cert(openssl: str, out: Path) -> tuple[Path, Path]:
    """(key, certificate) PEM files for 127.0.0.1, valid one day."""
    key, cert = out / "key.pem", out / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert
