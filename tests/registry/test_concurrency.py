"""Several processes publishing at once, and a publisher killed mid-publish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hotswap.registry import Registry, local

MakeArtifact = Callable[..., Path]

PUBLISH = """
import sys
from hotswap.registry import Registry
reg = Registry(sys.argv[1])
for _ in range(int(sys.argv[3])):
    print(reg.publish(sys.argv[2], "shared").version, flush=True)
"""

# Publishes, but stalls inside the version-allocation critical section after copying the files, so the
# parent can SIGKILL it there: the worst moment (staging complete, lock held, nothing renamed yet).
STALL = """
import sys, time, pathlib
from hotswap.registry import Registry, local
original = local.LocalBackend._install
def stalled(self, stage, *args, **kwargs):
    pathlib.Path(sys.argv[3]).write_text(str(stage))
    time.sleep(60)
    return original(self, stage, *args, **kwargs)
local.LocalBackend._install = stalled
Registry(sys.argv[1]).publish(sys.argv[2], "victim")
"""


@pytest.mark.slow
def test_concurrent_publishers_get_distinct_versions(tmp_path: Path, make_artifact: MakeArtifact) -> None:
    root, src = tmp_path / "registry", make_artifact()
    procs = [
        subprocess.Popen([sys.executable, "-c", PUBLISH, str(root), str(src), "3"], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    versions = sorted(int(v) for out in outputs for v in out.split())
    assert versions == list(range(1, 13))
    reg = Registry(root)
    assert [m.version for m in reg.versions("shared")] == versions
    for v in versions:
        reg.fetch(f"shared@{v}")  # every version complete and verifiable


@pytest.mark.slow
def test_sigkill_mid_publish_leaves_no_partial_version(tmp_path: Path, make_artifact: MakeArtifact) -> None:
    root, src, marker = tmp_path / "registry", make_artifact(), tmp_path / "stage-path"
    proc = subprocess.Popen([sys.executable, "-c", STALL, str(root), str(src), str(marker)])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "publisher exited early"
        assert time.monotonic() < deadline, "publisher never reached the critical section"
        time.sleep(0.05)
    stage = Path(marker.read_text())
    assert stage.is_dir() and any(stage.iterdir())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    reg = Registry(root)
    assert reg.names() == []  # nothing visible
    m = reg.publish(src, "victim")  # the lock died with the process; publishing works at once
    assert m.version == 1
    assert not stage.exists()  # the dead publisher's staging directory was cleaned up
    assert json.loads((root / "public" / "victim" / "versions" / "1" / "manifest.json").read_text())["version"] == 1


def test_another_hosts_publish_in_progress_is_left_alone(tmp_path: Path, make_artifact: MakeArtifact) -> None:
    """A registry directory shared by several hosts: a staging directory named for another host is never
    cleaned up by pid (that pid means nothing here); this host's dead publishers' are."""
    root = tmp_path / "registry"
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process here
    theirs = root / ".staging" / f"{dead}-other-host.example-{'a' * 32}"
    ours = root / ".staging" / f"{dead}-{local._HOST}-{'b' * 32}"
    legacy = root / ".staging" / f"{dead}-{'c' * 32}"
    for d in (theirs, ours, legacy):
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"partial")
    Registry(root).publish(make_artifact(), "x")
    assert theirs.is_dir() and not ours.exists() and not legacy.exists()
