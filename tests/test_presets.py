"""Base presets: every tiny family builds, saves, loads back as the same checkpoint and is reproducible; `tiny` is
still the Llama every other test was written against; the real-shaped presets have the published parameter counts
(counted on the meta device: no weights are made)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap.basemodel import PRESETS, build_model, build_with_tokenizer, fingerprint, load_model, save_model
from hotswap.cli import main
from hotswap.errors import InvalidBaseModel
from hotswap.methods.api import decoder_experts

TINY = [name for name in PRESETS if name.startswith("tiny")]
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15]])  # past the tiny sliding window (8)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_round_trip(preset: str, tmp_path: Path) -> None:
    model = build_model(preset, seed=0)
    saved = save_model(model, tmp_path / "a")
    assert fingerprint(saved) == fingerprint(save_model(build_model(preset, seed=0), tmp_path / "again"))
    assert fingerprint(saved) != fingerprint(save_model(build_model(preset, seed=1), tmp_path / "seed1"))

    loaded = load_model(saved)
    assert type(loaded) is type(model) and loaded.config.model_type == PRESETS[preset].model_type
    assert fingerprint(save_model(loaded, tmp_path / "resaved")) == fingerprint(saved)
    built, back = _state(model), _state(loaded)
    assert built.keys() == back.keys() and all(torch.equal(built[k], back[k]) for k in built)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("preset", TINY)
def test_tiny_presets_share_the_tiny_scale(preset: str) -> None:
    model = build_model(preset)
    cfg = model.config
    facts = (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert facts == (256, 64, 2, 4, 2) and model.dtype == torch.float32
    assert model.get_input_embeddings().weight.shape == (256, 64)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == cfg.tie_word_embeddings


def test_tiny_families_cover_what_the_engine_must_handle() -> None:
    """Sliding windows shorter than a test prompt, soft-capping, mixed layer types, head_dim != hidden / heads,
    fused projections, tied and untied heads, mixture-of-experts layers (stacked, transposed and biased experts, a
    shared expert) and attention sinks."""
    configs = {name: build_model(name).config for name in TINY}
    for name in ("tiny-mistral", "tiny-gemma2", "tiny-gemma3"):
        assert 1 <= configs[name].sliding_window < IDS.shape[1], name
    gemma2 = configs["tiny-gemma2"]
    assert gemma2.attn_logit_softcapping and gemma2.final_logit_softcapping
    assert set(configs["tiny-gemma3"].layer_types) == {"sliding_attention", "full_attention"}
    wide = {n for n, c in configs.items() if getattr(c, "head_dim", None) not in (None, c.hidden_size // 4)}
    assert wide == {
        "tiny-qwen3",
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-qwen3-moe",
    }  # head_dim 32, not hidden / heads = 16
    assert {c.tie_word_embeddings for c in configs.values()} == {True, False}
    names = {n.rsplit(".", 1)[-1] for n, _ in build_model("tiny-phi3").named_modules()}
    assert {"qkv_proj", "gate_up_proj"} <= names and not names & {"q_proj", "gate_proj"}
    moe = {n: decoder_experts(build_model(n)) for n in TINY}
    assert {n for n, found in moe.items() if found} == {
        "tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-olmoe", "tiny-gpt-oss"
    }  # fmt: skip
    oss = next(iter(moe["tiny-gpt-oss"].values()))
    assert oss.is_transposed and oss.has_bias and oss.num_experts == 4
    assert "shared_expert" in {n.rsplit(".", 1)[-1] for n, _ in build_model("tiny-qwen2-moe").named_modules()}
    assert build_model("tiny-gpt-oss").model.layers[0].self_attn.sinks.shape == (4,)


def test_final_soft_capping_bends_the_tiny_gemma2_logits() -> None:
    capped = build_model("tiny-gemma2")
    plain = build_model("tiny-gemma2", final_logit_softcapping=None)
    with torch.no_grad():
        assert (capped(IDS).logits - plain(IDS).logits).abs().max() > 1e-3


def test_tiny_is_still_the_llama_every_test_was_written_against(tmp_path: Path) -> None:
    """`tiny` must keep its random weights: build it the way it was built before presets named their family."""
    torch.manual_seed(0)
    old = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       tie_word_embeddings=False))  # fmt: skip
    new = build_model("tiny", seed=0)
    assert type(new) is LlamaForCausalLM
    assert fingerprint(save_model(new, tmp_path / "new")) == fingerprint(save_model(old, tmp_path / "old"))
    # and W1's shape is SmolLM2-135M's as before
    w1 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True).to_dict()  # fmt: skip
    built = build_model("smollm2-135m", device="meta").config.to_dict()
    assert {k: v for k, v in built.items() if k != "dtype"} == {k: v for k, v in w1.items() if k != "dtype"}


# parameter counts of the published checkpoints, tied heads counted once
REAL = {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768, "gemma-3-270m": 268_098_176,
        "phi-3-mini": 3_821_079_552}  # fmt: skip


@pytest.mark.parametrize(("preset", "count"), REAL.items())
def test_real_shaped_presets_have_the_published_parameter_count(preset: str, count: int) -> None:
    model = build_model(preset, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count
    assert all(p.is_meta for p in model.parameters())


def test_real_shaped_presets_keep_the_published_attention_layout() -> None:
    gemma = build_model("gemma-3-270m", device="meta").config
    assert gemma.head_dim == 256 and gemma.sliding_window == 512 and gemma.tie_word_embeddings
    assert [i for i, t in enumerate(gemma.layer_types) if t == "full_attention"] == [5, 11, 17]
    phi = build_model("phi-3-mini", device="meta")
    assert phi.config.sliding_window == 2047 and not phi.config.tie_word_embeddings
    assert phi.model.layers[0].self_attn.qkv_proj.weight.shape == (3 * 3072, 3072)
    qwen = build_model("qwen2.5-0.5b", device="meta").config
    assert qwen.rope_parameters["rope_theta"] == 1_000_000.0 and qwen.num_key_value_heads == 2


def test_overridden_depth_repeats_the_layer_type_pattern() -> None:
    config = build_model("gemma-3-270m", device="meta", num_hidden_layers=7).config
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_build_with_tokenizer_every_preset(preset: str, tmp_path: Path) -> None:
    """The tokenizer sets the vocabulary and special tokens of any family; tiny ones save and load with it."""
    tiny = preset in TINY
    model, tok = build_with_tokenizer(preset, "minilm", seed=0, device=None if tiny else "meta")
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert model.generation_config.eos_token_id == tok.sep_token_id and model.config.pad_token_id == tok.pad_token_id
    if tiny:
        saved = save_model(model, tmp_path / "base", tok)
        assert load_model(saved).config.vocab_size == len(tok)
        assert (saved / "tokenizer.json").is_file()


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(InvalidBaseModel, match="unknown base preset 'tiny-gpt5'; choose from tiny, tiny-mistral"):
        build_model("tiny-gpt5")


def test_cli_builds_any_family_and_lists_every_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["base", "build", "--preset", "tiny-phi3", "--seed", "3", "--out", str(tmp_path / "phi3")]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint {fingerprint(tmp_path / 'phi3')}" in out
    assert load_model(tmp_path / "phi3").config.model_type == "phi3"
    with pytest.raises(SystemExit):
        main(["base", "build", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in PRESETS)
