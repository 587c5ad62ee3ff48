"""LoRA on MoE experts (PEFT's target_parameters) refused at load and at publish when broken: each edit of a good
artifact (its safetensors rewritten, its adapter_config.json changed) is one ArtifactRejected line naming the tensor
or the module at fault, and publishing it against the base writes nothing. The good artifact is the control."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from hotswap.basemodel import build_model, fingerprint, load_model, save_model
from hotswap.errors import ArtifactRejected
from hotswap.methods import base_checker, load_adapter
from hotswap.methods.api import BaseInfo
from hotswap.methods.lora.kind import ExpertLoraFactors, ExpertLoraKind
from hotswap.registry import PEFT_CONFIG, Registry
from hotswap.train import RandomLoraConfig, random_lora

WEIGHTS = "adapter_model.safetensors"
EXPERTS = "model.layers.1.mlp.experts"  # PEFT nests one wrapper per targeted parameter, the first innermost:
GATE_UP = f"{EXPERTS}.base_layer"  # gate_up_proj's factors (registered first)
DOWN = EXPERTS  # down_proj's
PEFT = "base_model.model."
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bases")
    return {p: save_model(build_model(p, seed=0), d / p) for p in ("tiny-qwen3-moe", "tiny")}


@pytest.fixture(scope="module")
def good(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-2 LoRA on o_proj and on both projections of every layer's experts (4 experts), on tiny Qwen3-MoE."""
    config = RandomLoraConfig(rank=2, seed=1, init_std=0.2, target_modules=("o_proj",), target_parameters=("experts",))
    return random_lora(bases["tiny-qwen3-moe"], tmp_path_factory.mktemp("good") / "good", config)


def test_the_good_artifact_loads_with_its_expert_factors(good: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    """The control: PEFT's nesting read as gate_up_proj inside, down_proj outside; it publishes with the check."""
    base = bases["tiny-qwen3-moe"]
    loaded = load_adapter(good, "good@1", "lora", BaseInfo.of(load_model(base)))
    factors = loaded.linear[EXPERTS].parts[ExpertLoraKind.name]
    assert isinstance(factors, ExpertLoraFactors) and factors.rank == 2
    (ga, gb), (da, db) = factors.factors["gate_up_proj"], factors.factors["down_proj"]
    assert (ga.shape, gb.shape, da.shape, db.shape) == ((4, 2, 64), (4, 2, 64), (4, 2, 32), (4, 2, 64))
    tensors = load_file(good / WEIGHTS)
    torch.testing.assert_close(da[3], tensors[f"{PEFT}{DOWN}.lora_A.weight"][6:8])  # expert 3's rows
    torch.testing.assert_close(db[3, 1], 8.0 * tensors[f"{PEFT}{DOWN}.lora_B.weight"][:, 1 * 4 + 3])  # alpha/r = 8
    reg = Registry(tmp_path / "reg")
    assert reg.publish(good, "good", base_fingerprint=fingerprint(base), check=base_checker(base)).version == 1


def _tensors(change: Callable[[Tensors], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        t = load_file(d / WEIGHTS)
        change(t)
        save_file(t, d / WEIGHTS)

    return edit


def _config(**fields: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = json.loads((d / PEFT_CONFIG).read_text())
        (d / PEFT_CONFIG).write_text(json.dumps({**data, **fields}))

    return edit


def _poke(key: str, value: float) -> Callable[[Tensors], None]:
    def change(t: Tensors) -> None:
        t[key] = t[key].clone()
        t[key][1, 2] = value

    return change


def _nest_deeper(t: Tensors) -> None:
    """A third nested pair under layer 1's experts (PEFT would write it for a third targeted parameter)."""
    t[f"{PEFT}{EXPERTS}.base_layer.base_layer.lora_A.weight"] = torch.zeros(8, 64)
    t[f"{PEFT}{EXPERTS}.base_layer.base_layer.lora_B.weight"] = torch.zeros(64, 8)


A_DOWN, B_DOWN, A_GATE_UP, B_GATE_UP = (f"{PEFT}{m}.lora_{x}.weight" for m in (DOWN, GATE_UP) for x in "AB")
ANY_EXPERTS = r"model\.layers\.\d\.mlp\.experts"
# case -> (the edit, a regex the one-line message must match: the tensor or module at fault)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "a-width": (
        _tensors(lambda t: t.update({A_DOWN: torch.zeros(8, 33)})),
        re.escape(f"tensor {DOWN}.lora_A.weight has shape (8, 33), this base needs (8, 32)"),
    ),
    "a-rank-not-per-expert": (  # rank 2 for 3 of the 4 experts
        _tensors(lambda t: t.update({A_GATE_UP: t[A_GATE_UP][:6].clone()})),
        re.escape(f"tensor {GATE_UP}.lora_A.weight has shape (6, 64), this base needs (8, 64)"),
    ),
    "b-transposed": (
        _tensors(lambda t: t.update({B_DOWN: t[B_DOWN].T.contiguous()})),
        re.escape(f"tensor {DOWN}.lora_B.weight has shape (8, 64), this base needs (64, 8)"),
    ),
    "a-nan": (_tensors(_poke(A_GATE_UP, float("nan"))), re.escape(f"tensor {A_GATE_UP} holds NaN")),
    "b-inf": (_tensors(_poke(B_DOWN, float("inf"))), re.escape(f"tensor {B_DOWN} holds NaN or infinite")),
    "b-missing": (_tensors(lambda t: t.pop(B_GATE_UP)), re.escape(f"lacks tensor '{GATE_UP}.lora_B.weight'")),
    "a-missing": (_tensors(lambda t: t.pop(A_DOWN)), re.escape(f"lacks tensor '{DOWN}.lora_A.weight'")),
    "one-target-two-nested": (  # the config names down_proj only: nothing for the inner tensors to adapt
        _config(target_parameters=["mlp.experts.down_proj"]),
        rf"tensors under {ANY_EXPERTS} nested 1 deep, but its target_parameters match 1 of its parameters "
        r"\(down_proj\)",
    ),
    "no-targets": (
        _config(target_parameters=None),
        rf"tensors under {ANY_EXPERTS} nested [01] deep, but its target_parameters match 0 of its parameters "
        r"\(none\)",
    ),
    "nested-deeper": (
        _tensors(_nest_deeper),
        re.escape(
            f"{EXPERTS} nested 2 deep, but its target_parameters match 2 of its parameters (gate_up_proj, down_proj)"
        ),
    ),
    "rank-pattern-edited": (  # down_proj's rank 2 -> 3: its (E*r, in) factors no longer fit
        _config(rank_pattern={"down_proj": 3}),
        rf"tensor {ANY_EXPERTS}\.lora_A\.weight has shape \(8, 32\), this base needs \(12, 32\)",
    ),
    "magnitude-on-experts": (
        _tensors(lambda t: t.update({f"{PEFT}{DOWN}.lora_magnitude_vector": torch.ones(64)})),
        re.escape(f"{DOWN}.down_proj takes plain LoRA (lora_A, lora_B)"),
    ),
    "deeper-base": (  # layer 2 of a 2-layer base
        _tensors(lambda t: t.update({k.replace(".layers.1.", ".layers.2."): v.clone() for k, v in t.items()})),
        r"tensor model\.layers\.2\.[a-z_.]+\.lora_[AB]\.weight targets 'model\.layers\.2\.",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_expert_lora_is_refused_in_one_line(
    case: str, good: Path, bases: dict[str, Path], tmp_path: Path
) -> None:
    edit, words = CASES[case]
    bad = shutil.copytree(good, tmp_path / "bad")
    edit(bad)
    base = bases["tiny-qwen3-moe"]
    with pytest.raises(ArtifactRejected) as info:
        load_adapter(bad, "bad@1", "lora", BaseInfo.of(load_model(base)))
    message = str(info.value)
    assert message.startswith("bad@1: ") and re.search(words, message) and "\n" not in message, message
    _refused_at_publish(bad, base, words, tmp_path)


def _refused_at_publish(bad: Path, base: Path, words: str, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    reg = Registry(root)
    with pytest.raises(ArtifactRejected, match=words) as info:
        reg.publish(bad, "bad", base_fingerprint=fingerprint(base), check=base_checker(base))
    assert "\n" not in str(info.value)
    assert reg.names() == [] and not [p for p in root.rglob("*") if p.is_file() and p.name != ".lock"]


def test_an_expert_lora_on_a_dense_base_is_refused(good: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    """Made for an MoE base, checked against the dense tiny Llama (same hidden size, no experts): the experts'
    tensors target nothing there."""
    words = rf"tensor {ANY_EXPERTS}[a-z_.]*\.lora_[AB]\.weight targets '{ANY_EXPERTS}[a-z_.]*', not a linear layer"
    with pytest.raises(ArtifactRejected, match=f"^good@1: {words}") as info:
        load_adapter(good, "good@1", "lora", BaseInfo.of(load_model(bases["tiny"])))
    assert "\n" not in str(info.value)
    _refused_at_publish(good, bases["tiny"], words, tmp_path)


GATE = r"model\.layers\.\d\.mlp\.gate"
# PEFT itself can put a LoRA on any parameter (a ParamWrapper); the engine adapts the experts' 3-D projections and
# the blocks' linears only: the router's weight, an expert bias
NOT_SERVED = {
    "router": ("tiny-mixtral", "mlp.gate.weight",
               rf"tensor {GATE}\.lora_[AB]\.weight targets '{GATE}', not a linear layer \(or MoE experts\)"),
    "expert-bias": ("tiny-gpt-oss", "mlp.experts.gate_up_proj_bias",
                    rf"{ANY_EXPERTS}\.gate_up_proj_bias is not an expert projection \(LoRA adapts 3-D expert"),
}  # fmt: skip


@pytest.mark.parametrize("case", NOT_SERVED)
def test_a_peft_lora_on_another_parameter_is_refused(case: str, tmp_path: Path) -> None:
    preset, target, words = NOT_SERVED[case]
    base = save_model(build_model(preset, seed=0), tmp_path / "base")
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=[], target_parameters=[target]))
    model.save_pretrained(tmp_path / case)
    assert load_file(tmp_path / case / WEIGHTS)  # PEFT saved the factors
    with pytest.raises(ArtifactRejected, match=f"^{case}@1: {words}") as info:
        load_adapter(tmp_path / case, f"{case}@1", "lora", BaseInfo.of(load_model(base)))
    assert "\n" not in str(info.value)
    _refused_at_publish(tmp_path / case, base, words, tmp_path)
