"""The issue's end-to-end case on a Qwen3-MoE-shaped base (its head tied here, so trainable tokens reach it):
`hotswap train` trains LoRA on every expert (``--target-parameters experts``), LoRA on the input embedding and the
output head (``--targets ... embed_tokens,lm_head``), PEFT's trainable tokens (``--trainable-tokens``) and a plain
LoRA; each learns the built-in task and publishes PEFT's own files, and the engine serves all four unmerged in one
batch with each trained model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hotswap.basemodel import build_model, save_model
from hotswap.cli import main
from hotswap.errors import InvalidArgument
from hotswap.methods.lora import LoraOptions
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import TrainConfig, train

PROBE = [[5, 12], [5, 30, 11], [7, 8, 9, 10]]
RUNS: dict[str, dict] = {
    "experts": {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["experts"]},
    "embedding": {"target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"]},
    "tokens": {"target_modules": ["q_proj", "v_proj"], "trainable_tokens": [5, 7, 11, 12, 30]},
    "plain": {"target_modules": ["q_proj", "v_proj"]},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Each run on the tiny Qwen3-MoE base with a tied head, published to one registry."""
    root = tmp_path_factory.mktemp("emb")
    model = build_model("tiny-qwen3-moe", seed=0, initializer_range=0.1, tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    base = save_model(model, root / "base")
    registry = root / "registry"
    results = {}
    for name, options in RUNS.items():
        config = TrainConfig(method="lora", options=options, steps=100, eval_steps=50, seed=0)
        results[name] = train(
            config, base, "builtin:mapping", root / name, push=f"t-{name}", registry=registry, quiet=True
        )
    return base, registry, results


@pytest.mark.parametrize("name", list(RUNS))
def test_learns_and_publishes_peft_files(runs: tuple, name: str) -> None:
    _, registry, results = runs
    m = results[name].metrics
    assert m["eval_loss"] < m["eval_loss_untrained"] - 0.5, m
    keys = load_file(Registry(registry).fetch(f"t-{name}")[1] / "adapter_model.safetensors")
    parts = {
        "experts": ("mlp.experts.base_layer.lora_A.weight", "mlp.experts.lora_B.weight"),
        "embedding": ("embed_tokens.lora_embedding_A", "lm_head.lora_A.weight"),
        "tokens": ("embed_tokens.token_adapter.trainable_tokens_delta",),
        "plain": ("q_proj.lora_A.weight",),
    }[name]
    assert all(any(k.endswith(p) for k in keys) for p in parts), sorted(keys)


def test_served_in_one_batch_with_the_trained_logits(runs: tuple) -> None:
    base, registry, results = runs
    with Engine(base, registry, max_batch=len(RUNS) * len(PROBE), max_seq_len=64) as engine:
        requests = [Request(prompt_ids=ids, adapters=[f"t-{n}"]) for n in RUNS for ids in PROBE]
        served = engine.forward_logits(requests)
    for i, (name, ids) in enumerate((n, ids) for n in RUNS for ids in PROBE):
        model = results[name].model.eval()
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(served[i], expected, rtol=0, atol=1e-4, msg=f"{name} {ids}")


def test_cli_flags_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: tuple) -> None:
    base = runs[0]
    args = ["train", "--method", "lora", "--base", str(base), "--data", "builtin:mapping", "--steps", "2", "--quiet"]
    assert main([*args, "--trainable-tokens", "3,9", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--trainable-tokens", "3,3", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().endswith("trainable_tokens must be distinct token ids, got [3, 3]")
    embedding_and_tokens = [
        "--targets",
        "q_proj,embed_tokens",
        "--trainable-tokens",
        "3,9",
        "--out",
        str(tmp_path / "d"),
    ]
    assert main([*args, *embedding_and_tokens]) == 2  # PEFT cannot put trainable tokens on a LoRA embedding
    assert capsys.readouterr().err.strip().endswith("trainable_token_indices cannot be applied to modules of type "
                                                    "<class 'peft.tuners.lora.layer.Embedding'>")  # fmt: skip
    assert main([*args, "--trainable-tokens", "3,256", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip().endswith("trainable token 256 is outside the base's vocabulary of 256")
    assert main([*args, "--target-parameters", "mlp.experts.nope", "--out", str(tmp_path / "f")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("target parameter 'mlp.experts.nope' names no parameter of Qwen3MoeForCausalLM")
    )
    with pytest.raises(SystemExit):
        main([*args, "--trainable-tokens", "3,x", "--out", str(tmp_path / "c")])
    assert "invalid comma-separated int value: '3,x'" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="distinct token ids"):
        LoraOptions(trainable_tokens=(-1,))
