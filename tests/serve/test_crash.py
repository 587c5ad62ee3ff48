"""Crashes: ``hotswap serve`` SIGKILLed mid-traffic while the registry is being published to, and ``hotswap push``
SIGKILLed mid-write. Every call ends complete and correct or UNAVAILABLE; the registry stays whole; a restarted
server answers as before."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hotswap import cli
from hotswap.basemodel import fingerprint
from hotswap.client import Client
from hotswap.errors import ServerUnavailable
from hotswap.registry import Registry
from hotswap.train import RandomLoraConfig, random_bitfit, random_bottlenecks, random_lora, random_prefix
from tests.serve.serverutil import PROMPT, free_port

CLI = [sys.executable, "-m", "hotswap.cli"]
OTHER_PROMPT = "pack my box with five dozen liquor jugs"
BIG_SHARDS = 32  # x 2 MiB: a push copies them one by one into its staging directory, long enough to kill it there


@dataclass(frozen=True)
class Call:
    prompt: str
    adapters: tuple[str, ...]
    max_new_tokens: int


# Pinned refs answer the same whatever is published meanwhile; "lora" and "lora:prod" move to each new version,
# but every version of "lora" is the same artifact, so they answer the same tokens too.
CALLS = (
    Call(PROMPT, (), 32),
    Call(OTHER_PROMPT, (), 24),
    Call(PROMPT, ("lora@1",), 32),
    Call(PROMPT, ("dora@1",), 28),
    Call(PROMPT, ("bitfit@1",), 32),
    Call(OTHER_PROMPT, ("prefix@1",), 32),
    Call(PROMPT, ("bottleneck@1",), 24),
    Call(PROMPT, ("lora",), 32),
    Call(PROMPT, ("lora:prod",), 32),
)


@dataclass
class Outcome:
    call: int
    stream: bool
    tokens: list[int] = field(default_factory=list)  # received (a stream's chunks, or the unary answer)
    final: list[int] | None = None  # the final response's token ids; None when the call failed
    resolved: list[str] = field(default_factory=list)
    error: BaseException | None = None
    after_kill: bool = False  # the call ended (with its error) once the kill was under way


def _start(args: list[str], logs: Path) -> subprocess.Popen[str]:
    """Start ``hotswap serve`` with output to ``logs``.out/.err and wait (bounded) until it says it serves."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(args, stdout=fo, stderr=fe, text=True)
    deadline = time.monotonic() + 120
    while not re.search(r"serving .* on 127\.0\.0\.1:\d+", out.read_text()):
        assert proc.poll() is None, f"serve exited {proc.returncode}: {err.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "serve never became ready"
        time.sleep(0.05)
    return proc


def _solo(target: str) -> list[list[int]]:
    """Each call alone, one after another: the answers every concurrent run must reproduce."""
    answers = []
    with Client(target, timeout=60) as c:
        for call in CALLS:
            g = c.generate(call.prompt, adapters=list(call.adapters), max_new_tokens=call.max_new_tokens,
                           ignore_eos=True)  # fmt: skip
            assert g.finish_reason == "length" and len(g.token_ids) == call.max_new_tokens
            answers.append(g.token_ids)
    return answers


def _big_artifact(out: Path) -> Path:
    """A hotswap-format artifact of BIG_SHARDS safetensors files (64 MiB): slow enough to copy to be killed."""
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(BIG_SHARDS):
        save_file(
            {f"w{i}": rng.standard_normal((512, 1024)).astype(np.float32)}, str(out / f"shard-{i:03d}.safetensors")
        )
    (out / "hotswap_config.json").write_text(json.dumps({"method": "bulk"}))
    return out


def _kill_push_mid_write(root: Path, src: Path, at_files: int) -> tuple[int, int]:
    """Run ``hotswap push src`` and SIGKILL it once its staging directory holds ``at_files`` entries.
    Returns (its pid, entries seen when killed: fewer than the artifact's files means mid-copy; -1: it finished)."""
    proc = subprocess.Popen([*CLI, "push", str(src), "--name", "big", "--registry", str(root), "--no-base"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, seen = time.monotonic() + 60, -1
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "push never got to copying"
            stages = list((root / ".staging").glob(f"{proc.pid}-*")) if (root / ".staging").is_dir() else []
            try:
                n = len(os.listdir(stages[0])) if stages else 0
            except FileNotFoundError:  # renamed into place just now
                n = 0
            if n >= at_files:
                os.kill(proc.pid, signal.SIGKILL)
                seen = n
                break
            time.sleep(0.0005)
    finally:
        proc.wait(timeout=30)
    return proc.pid, seen


def _traffic(target: str, stream: bool, first: int, stop: threading.Event, killed: threading.Event,
             live: dict[int, int], key: int, outcomes: list[Outcome]) -> None:  # fmt: skip
    """Call CALLS round-robin from ``first`` until ``stop`` or the first failure (bounded: 200 calls)."""
    with Client(target, timeout=60) as c:
        for i in range(200):
            if stop.is_set():
                return
            k = (first + i) % len(CALLS)
            call, o = CALLS[k], Outcome(call=k, stream=stream)
            params = dict(adapters=list(call.adapters), max_new_tokens=call.max_new_tokens, ignore_eos=True)
            try:
                if stream:
                    s = c.stream(call.prompt, **params)
                    for chunk in s:
                        o.tokens.extend(chunk.token_ids)
                        live[key] = len(o.tokens)
                    result = s.response
                    assert result is not None, "a stream that ended without a final response"
                else:
                    result = c.generate(call.prompt, **params)
                    o.tokens = list(result.token_ids)
                o.final, o.resolved = list(result.token_ids), [ref for ref, _ in result.adapters]
            except BaseException as e:  # judged by the test: only ServerUnavailable after the kill is allowed
                o.error, o.after_kill = e, killed.is_set()
            finally:
                live[key] = 0
                outcomes.append(o)
            if o.error is not None:
                return


def _publisher(root: Path, sources: dict[str, Path], fp: str, stop: threading.Event,
               published: dict[str, list[int]], errors: list[BaseException]) -> None:  # fmt: skip
    """Publish new versions (same artifacts) of the served adapters, "lora" moving its "prod" alias (bounded)."""
    reg, names = Registry(root), ("lora", "dora", "lora", "prefix")
    try:
        for i in range(60):  # ~0.2 s apart: publishing goes on while the clients resolve "lora" and "lora:prod"
            if stop.is_set():
                return
            name = names[i % len(names)]
            m = reg.publish(sources[name], name, base_fingerprint=fp, aliases=["prod"] if name == "lora" else [])
            published.setdefault(name, []).append(m.version)
            stop.wait(0.2)
    except BaseException as e:
        errors.append(e)


def _check_registry(root: Path, tmp_path: Path) -> dict[str, int]:
    """Every version of every adapter resolves, verifies and pulls; versions are 1..N with nothing else beside
    them; nothing is left staged. Returns name -> latest version."""
    reg, latest = Registry(root), {}
    for name in reg.names():
        versions = [m.version for m in reg.versions(name)]
        assert versions == list(range(1, len(versions) + 1)), (name, versions)
        adapter_dir = root / "public" / name
        assert sorted(os.listdir(adapter_dir / "versions"), key=int) == [str(v) for v in versions]
        assert set(os.listdir(adapter_dir)) <= {"versions", "aliases.json", "alias_history.jsonl", ".lock"}, os.listdir(
            adapter_dir
        )
        for v in versions:
            m, path = reg.fetch(f"{name}@{v}")  # verifies every file's size and sha256
            assert (m.name, m.version) == (name, v) and sorted(p.name for p in path.iterdir()) == sorted(
                [*m.files, "manifest.json"]
            )
            if name != "big":  # 64 MiB each: fetched (verified) above, pulled once below
                assert reg.pull(f"{name}@{v}", tmp_path / "pulled" / f"{name}-{v}").files == m.files
        for alias, v in reg.aliases(name).items():
            assert v in versions, (name, alias, v)
        latest[name] = versions[-1]
    staging = root / ".staging"
    assert not staging.exists() or not list(staging.iterdir()), list(staging.iterdir())
    return latest


@pytest.mark.slow
def test_sigkill_server_and_publisher_mid_traffic(text_base: Path, tmp_path: Path) -> None:
    root, art = tmp_path / "registry", tmp_path / "artifacts"
    fp = fingerprint(text_base)
    sources = {
        "lora": random_lora(text_base, art / "lora", RandomLoraConfig(rank=4, seed=1, init_std=0.3)),
        "dora": random_lora(text_base, art / "dora", RandomLoraConfig(rank=4, seed=2, init_std=0.3, use_dora=True)),
        "bitfit": random_bitfit(text_base, art / "bitfit", seed=3, std=0.3),
        "prefix": random_prefix(text_base, art / "prefix", num_virtual_tokens=4, seed=4),
        "bottleneck": random_bottlenecks(text_base, {art / "bottleneck": 5}, bottleneck_dim=8, std=0.3)[0],
    }
    reg = Registry(root)
    for name, src in sources.items():
        reg.publish(src, name, base_fingerprint=fp, aliases=["prod"] if name == "lora" else [])
    big = _big_artifact(art / "big")
    assert cli.main(["push", str(big), "--name", "big", "--registry", str(root), "--no-base"]) == 0  # big@1

    port = free_port()
    target = f"127.0.0.1:{port}"
    args = [*CLI, "serve", "--base", str(text_base), "--registry", str(root), "--port", str(port), "--no-auth",
            "--metrics-port", "0", "--max-batch", "8"]  # fmt: skip
    procs = [_start(args, tmp_path / "serve-1")]
    threads: list[threading.Thread] = []
    stop, killed = threading.Event(), threading.Event()
    try:
        expected = _solo(target)
        assert expected[7] == expected[8] == expected[2]  # "lora", "lora:prod", "lora@1": one artifact

        outcomes: list[Outcome] = []
        live: dict[int, int] = {}
        published: dict[str, list[int]] = {}
        pub_errors: list[BaseException] = []
        for i in range(6):  # 3 unary, 3 streaming clients; the first two start on the moving refs
            t = threading.Thread(
                target=_traffic, args=(target, i % 2 == 1, (7 + i) % len(CALLS), stop, killed, live, i, outcomes)
            )
            threads.append(t)
        threads.append(threading.Thread(target=_publisher, args=(root, sources, fp, stop, published, pub_errors)))
        for t in threads:
            t.start()

        # Meanwhile: two pushes SIGKILLed while copying their files, then one that completes.
        kills = [_kill_push_mid_write(root, big, at) for at in (3, BIG_SHARDS // 2)]
        assert any(0 < seen <= BIG_SHARDS for _, seen in kills), kills  # at least one landed mid-write (copying)
        big_latest = 1 + sum(seen < 0 for _, seen in kills)  # a push that finished before its kill counts
        assert [m.version for m in reg.versions("big")] == list(range(1, big_latest + 1))  # no partial version
        assert cli.main(["push", str(big), "--name", "big", "--registry", str(root), "--no-base"]) == 0
        big_latest += 1
        assert [m.version for m in reg.versions("big")] == list(range(1, big_latest + 1))
        assert not [p for pid, _ in kills for p in (root / ".staging").glob(f"{pid}-*")]  # the dead pushes' leftovers

        # SIGKILL the server once traffic has flowed, versions were published and a stream is half-way through.
        deadline = time.monotonic() + 60
        while not (
            sum(o.final is not None for o in outcomes) >= 12
            and sum(map(len, published.values())) >= 3
            and any(n > 0 for n in list(live.values()))
        ):
            assert time.monotonic() < deadline, (len(outcomes), published, pub_errors)
            assert not any(o.error for o in outcomes), [o.error for o in outcomes if o.error]
            time.sleep(0.002)
        killed.set()
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(timeout=30) == -signal.SIGKILL
        time.sleep(0.3)  # let the clients see the dead server, then stop the publisher and what is left
        stop.set()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads)
        assert not pub_errors, pub_errors

        # Every call: the complete solo answer, or UNAVAILABLE after the kill with a prefix of it.
        failed = [o for o in outcomes if o.error is not None]
        for o in outcomes:
            want = expected[o.call]
            if o.error is None:
                assert o.final == want and o.tokens == want, (CALLS[o.call], o)
                pinned = [a for a in CALLS[o.call].adapters if "@" in a]
                assert not pinned or o.resolved == pinned, o
            else:
                assert type(o.error) is ServerUnavailable and o.after_kill, (CALLS[o.call], repr(o.error))
                assert o.final is None and o.tokens == want[: len(o.tokens)], (CALLS[o.call], o)
        assert failed, "the kill interrupted no call"
        assert any(o.stream and 0 < len(o.tokens) < len(expected[o.call]) for o in failed), "no stream cut mid-way"

        # Restart with the same flags: SERVING, the registry whole, the same answers.
        procs.append(_start(args, tmp_path / "serve-2"))
        with Client(target, timeout=60) as c:
            assert c.health() == "SERVING"
        latest = _check_registry(root, tmp_path)
        assert latest["big"] == big_latest and latest["bitfit"] == 1
        for name, versions in published.items():
            assert versions == list(range(2, latest[name] + 1)), (name, versions)  # no gap, no duplicate
        assert reg.aliases("lora") == {"prod": latest["lora"]}
        for o in outcomes:  # what the server resolved "lora" / "lora:prod" to is a version that exists
            assert all(reg.resolve(ref).ref == ref for ref in o.resolved)
        for ref, dest in ((f"big@{big_latest}", "big"), ("lora:prod", "lora-prod")):  # `hotswap pull` verifies too
            assert cli.main(["pull", ref, "--to", str(tmp_path / "pulled" / dest), "--registry", str(root)]) == 0
        assert _solo(target) == expected
        with Client(target, timeout=60) as c:
            g = c.generate(PROMPT, adapters=["lora"], max_new_tokens=32, ignore_eos=True)
        assert g.adapters == [(f"lora@{latest['lora']}", 1.0)] and g.token_ids == expected[7]
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for t in threads:
            t.join(timeout=30)
