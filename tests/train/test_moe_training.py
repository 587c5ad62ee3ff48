"""Training LoRA on an MoE base's experts (``hotswap train --target-parameters experts``, PEFT's target_parameters):
the eval loss goes down, the published artifact holds trained factors for every expert projection, loads in PEFT,
and the engine serves it with PEFT's logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from peft import PeftModel
from safetensors.torch import load_file

from hotswap.basemodel import load_model
from hotswap.cli import main
from hotswap.registry import PEFT_CONFIG, Registry
from hotswap.serve import Engine, Request
from tests.serve.reference import reference_logits

PROBE = [[5, 12, 30, 11], [7, 8, 9, 10, 13, 14, 15, 16, 17, 18]]
Bases = Callable[[str], tuple[Path, Path]]


@pytest.mark.slow
def test_lora_on_the_experts_trains_publishes_and_serves(
    family_bases: Bases, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = family_bases("tiny-qwen3-moe")
    registry = tmp_path / "registry"
    argv = ["--registry", str(registry), "train", "--method", "lora", "--base", str(base), "--data", "builtin:mapping",
            "--steps", "12", "--eval-steps", "12", "--batch-size", "8", "--data-size", "64",
            "--target-parameters", "experts", "--quiet", "--out", str(tmp_path / "run"), "--push", "moe"]  # fmt: skip
    code = main(argv)
    assert code == 0 and "published moe@1" in capsys.readouterr().out
    manifest, artifact = Registry(registry).fetch("moe")
    m = manifest.metrics
    assert m["eval_loss"] < m["eval_loss_untrained"] - 0.5, m

    config = json.loads((artifact / PEFT_CONFIG).read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    tensors = load_file(artifact / "adapter_model.safetensors")
    for layer in (0, 1):
        for nested, width in ((".base_layer", 64), ("", 32)):  # gate_up_proj (inside), down_proj (outside)
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts{nested}"
            assert tensors[f"{prefix}.lora_A.weight"].shape == (4 * 8, width)  # 4 experts at rank 8
            assert tensors[f"{prefix}.lora_B.weight"].abs().max() > 0, "B starts at zero: trained"

    peft = PeftModel.from_pretrained(load_model(base), artifact).eval()
    plain = load_model(base).eval()
    with Engine(base, registry, max_batch=4, max_seq_len=32, dtype="float32", device="cpu") as engine:
        served = engine.forward_logits([Request(prompt_ids=ids, adapters=["moe"]) for ids in PROBE])
    for ids, got in zip(PROBE, served, strict=True):
        ref = reference_logits(peft, ids)
        assert (ref - reference_logits(plain, ids)).abs().max() > 1e-3, "the adapter changes the output"
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


REFUSED = {  # PEFT's ParamWrapper takes neither DoRA nor dropout; a dense base has no experts
    "dora": (["--method", "dora"], "cannot attach LORA: lora.ParamWrapper does not work with use_dora=True."),
    "dropout": (["--method", "lora", "--dropout", "0.1"], "lora.ParamWrapper does not work with lora_dropout != 0."),
    "dense": (["--method", "lora"], "LlamaForCausalLM has no MoE experts in its decoder blocks to adapt"),
    "not-alone": (["--method", "lora", "--target-parameters", "experts,mlp.gate.weight"], "experts stands alone"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_lora_on_the_experts_cannot_train_is_refused_in_one_line(
    case: str, family_bases: Bases, trainable_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, words = REFUSED[case]
    base = trainable_base if case == "dense" else family_bases("tiny-qwen3-moe")[0]
    argv = ["train", "--base", str(base), "--data", "builtin:mapping", "--steps", "1", "--target-parameters",
            "experts", *args, "--quiet", "--out", str(tmp_path / "run")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hotswap: error: ") and words in err, err
    assert not (tmp_path / "run" / "adapter").exists()
