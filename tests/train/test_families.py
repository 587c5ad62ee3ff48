"""Training on every tested family: each method trains on each tiny family preset with its default targets resolved
against that base (Phi-3's fused qkv_proj / gate_up_proj included), its artifact passes its own reader against the
base (what publishing and serving run) and, in PEFT's format, loads in PEFT with the trained model's logits; each
method lowers the eval loss on one of the families."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from hotswap.basemodel import PRESETS, load_model
from hotswap.methods import base_checker
from hotswap.registry import HOTSWAP_CONFIG, PEFT_CONFIG
from hotswap.train import TrainConfig, train, trainable_methods

# `tiny` (Llama) is test_train.py's; of the mixture-of-experts families, Qwen3-MoE's shape stands for the others
# (their experts are no linears, so every method trains the same layers on each; serving tests them all)
MOE = "tiny-qwen3-moe"
FAMILIES = [name for name, preset in PRESETS.items() if name.startswith("tiny-") and not preset.moe] + [MOE]
METHODS = list(trainable_methods())
PEFT_FORMAT = {"lora", "dora", "adalora", "dylora", "plora", "prefix", "prompt", "ia3", "vera"}  # adapter_config.json
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LINEARS = {family: {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family == "tiny-phi3" else ALL_LINEAR
           for family in FAMILIES} | {MOE: {"q_proj", "k_proj", "v_proj", "o_proj"}}  # fmt: skip
# IA3's default: PEFT's own per model type; for a type PEFT does not list, the same roles by name
IA3 = {"tiny-mistral": {"k_proj", "v_proj", "down_proj"}, "tiny-qwen2": {"q_proj", "v_proj", "down_proj"},
       "tiny-qwen3": {"q_proj", "v_proj", "down_proj"}, "tiny-gemma2": {"q_proj", "v_proj", "down_proj"},
       "tiny-gemma3": {"q_proj", "v_proj", "down_proj"}, "tiny-phi3": {"qkv_proj", "down_proj"},
       "tiny-olmo2": {"k_proj", "v_proj", "down_proj"}, "tiny-granite": {"k_proj", "v_proj", "down_proj"},
       MOE: {"k_proj", "v_proj"}}  # fmt: skip
PROBE = torch.tensor([[5, 12, 30, 11, 7, 8, 9, 10, 13, 14, 15, 16]])  # past the tiny sliding window (8)

Bases = Callable[[str], tuple[Path, Path]]


def _options(method: str, small: Path) -> dict[str, object]:
    return {"small_model": str(small)} if method == "proxy" else {}


def _recorded_targets(artifact: Path) -> set[str]:
    """The target module names an artifact's config records (full module paths reduced to their last part)."""
    config_file = artifact / (PEFT_CONFIG if (artifact / PEFT_CONFIG).is_file() else HOTSWAP_CONFIG)
    targets = json.loads(config_file.read_text())["target_modules"]
    return {t.rsplit(".", 1)[-1] for t in targets}


def _expected_targets(method: str, family: str) -> set[str] | None:
    if method == "ia3":
        return IA3[family]
    if method == "bottleneck":
        return None  # its config records no targets; the reader checks o_proj / down_proj against the base
    if method in ("prefix", "prompt", "proxy"):
        return None
    return LINEARS[family]  # all-linear


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_every_family(method: str, family: str, family_bases: Bases, tmp_path: Path) -> None:
    base, small = family_bases(family)
    config = TrainConfig(method=method, options=_options(method, small), steps=2, eval_steps=2, batch_size=8)
    result = train(config, base, "builtin:mapping", tmp_path / "run", quiet=True)
    m = result.metrics
    assert m["eval_loss"] != m["eval_loss_untrained"] and m["trainable_params"] > 0
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}

    base_checker(base)(result.artifact, method)  # its reader accepts every tensor against this base
    expected = _expected_targets(method, family)
    if expected is not None:
        assert _recorded_targets(result.artifact) == expected
    cfg = load_model(base).config
    if method == "prefix":  # PEFT's key/value prefix uses the config's head_dim (32 on Qwen3 and Gemma, not 64 / 4)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        emb = load_file(result.artifact / "adapter_model.safetensors")["prompt_embeddings"]
        assert emb.shape == (8, cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim)

    assert (result.artifact / PEFT_CONFIG).is_file() == (method in PEFT_FORMAT)
    if method in PEFT_FORMAT:
        loaded = PeftModel.from_pretrained(load_model(base), result.artifact).eval()
        with torch.no_grad():
            want = result.model(input_ids=PROBE).logits[:, -PROBE.shape[1] :]
            got = loaded(input_ids=PROBE).logits[:, -PROBE.shape[1] :]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# Each method on a family where 40 steps at its default learning rate show clearly (Granite learns slowly: its
# logits are divided by logits_scaling 8; it trains every method in the test above).
LEARNS_ON = {"lora": "tiny-mistral", "dora": "tiny-qwen2", "adalora": "tiny-qwen2", "dylora": "tiny-qwen3",
             "plora": "tiny-gemma2", "bitfit": "tiny-phi3", "fishmask": "tiny-olmo2", "child-tuning": "tiny-olmo2",
             "bottleneck": "tiny-mistral", "prefix": "tiny-qwen2", "prompt": "tiny-qwen3", "proxy": "tiny-gemma2",
             "ia3": "tiny-gemma3", "vera": "tiny-qwen2"}  # fmt: skip


def test_every_method_has_a_family_to_learn_on() -> None:
    assert set(LEARNS_ON) == set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "family"), LEARNS_ON.items())
def test_method_lowers_the_eval_loss(method: str, family: str, family_bases: Bases, tmp_path: Path) -> None:
    base, small = family_bases(family)
    config = TrainConfig(method=method, options=_options(method, small), steps=40, eval_steps=40)
    m = train(config, base, "builtin:mapping", tmp_path / "run", quiet=True).metrics
    assert m["eval_loss"] < m["eval_loss_untrained"] - 0.5, m
