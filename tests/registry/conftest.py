"""Registry fixtures: small real artifacts built without torch, a registry in a temp dir, a local Hub server,
and ``any_registry``: the same test on both backends."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hotswap.registry import Registry
from tests.hubserver import HubServer

MakeArtifact = Callable[..., Path]
TOKEN, OTHER = "hub-writer", "other-org-token"  # may write org "team"; may write another org only


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN: {"team"}, OTHER: {"elsewhere"}}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HOTSWAP_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


@pytest.fixture(params=["local", "hub"])
def any_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    """An empty registry on each backend in turn: a temp directory, then ``hf://team`` on a local Hub server."""
    if request.param == "local":
        return Registry(tmp_path / "registry")
    request.getfixturevalue("hub")
    return Registry("hf://team")


@pytest.fixture
def make_artifact(tmp_path: Path) -> MakeArtifact:
    """Write a PEFT-shaped LoRA artifact (or a hotswap one with ``method=``) and return its directory."""
    counter = iter(range(10_000))

    def make(peft_type: str = "LORA", method: str | None = None, seed: int = 0, **config: object) -> Path:
        out = tmp_path / f"artifact-{next(counter)}"
        out.mkdir()
        rng = np.random.default_rng(seed)
        save_file(
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 8), np.float32)},
            str(out / "adapter_model.safetensors"),
        )
        if method is not None:
            (out / "hotswap_config.json").write_text(json.dumps({"method": method}))
        else:
            cfg = {"peft_type": peft_type, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
            (out / "adapter_config.json").write_text(json.dumps(cfg))
        return out

    return make


def publish_three(reg: Registry, make_artifact: MakeArtifact) -> Registry:
    """math@1 (prod), math@2 (staging) and math@3 in ``reg``."""
    reg.publish(make_artifact(), "math", aliases=["prod"])
    reg.publish(make_artifact(seed=1), "math", aliases=["staging"])
    reg.publish(make_artifact(seed=2), "math")
    return reg
