"""Every method's synthetic artifacts (``MethodSpec.random``, what benchmarks publish) on every tiny family preset:
their default targets resolve against that base (Phi-3's fused projections included), and the method's own reader
accepts every tensor against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hotswap.basemodel import PRESETS, build_model, save_model
from hotswap.methods import RandomKnobs, base_checker, registered
from hotswap.registry import PEFT_CONFIG
from tests.conftest import SMALL

FAMILIES = [name for name in PRESETS if name.startswith("tiny")]
WITH_RANDOM = [name for name, spec in registered().items() if spec.random is not None]


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_artifacts_of_every_method_fit_every_family(family: str, tmp_path: Path) -> None:
    base = save_model(build_model(family, seed=0), tmp_path / "base")
    small = save_model(build_model(family, seed=1, **SMALL), tmp_path / "small")
    knobs = RandomKnobs(rank=4, alpha=8.0, small=lambda: small)
    check = base_checker(base)
    phi3 = family == "tiny-phi3"
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    linears = {  # all-linear on the MoE families: their experts are no linears, a shared expert's are
        "tiny-phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},  # fused
        "tiny-mixtral": attention,
        "tiny-qwen3-moe": attention,
        "tiny-olmoe": attention,
        "tiny-gpt-oss": attention,
        "tiny-qwen2-moe": attention | mlp | {"shared_expert_gate"},
    }.get(family, attention | mlp)
    for method in WITH_RANDOM:
        (out,) = registered()[method].random(base, {tmp_path / method: 7}, knobs)  # type: ignore[misc]
        check(out, method)
        if method in ("lora", "dora"):  # all-linear: every decoder linear of this family
            targets = set(json.loads((out / PEFT_CONFIG).read_text())["target_modules"])
            assert targets == linears, (method, targets)
        if method == "ia3" and phi3:  # PEFT lists no Phi-3 default: keys and values are in the fused qkv_proj
            keys = load_file(out / "adapter_model.safetensors")
            assert {k.split(".")[-2] for k in keys} == {"qkv_proj", "down_proj"}
