"""Training with the base in half precision (`--dtype`): the base loads in that dtype, every trainable adapter weight
stays float32 and is published in float32, PEFT loads the artifact on a bf16 base, and a method that cannot train in
half precision is refused in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from hotswap.basemodel import load_model
from hotswap.cli import main
from hotswap.errors import InvalidArgument
from hotswap.methods import base_checker
from hotswap.registry import Registry
from hotswap.train import TrainConfig, train

PROBE = torch.tensor([[5, 12, 30, 11], [7, 8, 9, 10]])


def _dtypes(model: torch.nn.Module, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


def test_bf16_lora_trains_float32_adapters_that_peft_loads(trainable_base: Path, tmp_path: Path) -> None:
    config = TrainConfig(method="lora", steps=30, eval_steps=30, dtype="bfloat16")
    result = train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True)
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_untrained"] - 1.0, m
    assert _dtypes(result.model, trainable=False) == {torch.bfloat16}  # the base, as asked
    assert _dtypes(result.model, trainable=True) == {torch.float32}  # LoRA's A and B
    saved = load_file(result.artifact / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}

    loaded = PeftModel.from_pretrained(load_model(trainable_base, dtype=torch.bfloat16), result.artifact).eval()
    with torch.no_grad():
        want, got = result.model(input_ids=PROBE).logits, loaded(input_ids=PROBE).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    base_checker(trainable_base)(result.artifact, "lora")  # and it serves on the fp32 checkpoint


@pytest.mark.parametrize("method", ["bitfit", "bottleneck", "prefix", "ia3", "proxy"])
def test_bf16_keeps_every_methods_trainable_weights_float32(
    method: str, trainable_base: Path, trainable_small: Path, tmp_path: Path
) -> None:
    """Our own methods (bitfit, bottleneck, proxy's expert) as well as PEFT's."""
    options = {"small_model": str(trainable_small)} if method == "proxy" else {}
    config = TrainConfig(method=method, options=options, steps=3, eval_steps=3, dtype="bfloat16")
    result = train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_untrained"]
    assert _dtypes(result.model, trainable=True) == {torch.float32}
    base = result.model.base if method == "proxy" else result.model
    assert torch.bfloat16 in _dtypes(base, trainable=False)
    saved = {t.dtype for f in result.artifact.rglob("*.safetensors") for t in load_file(f).values()}
    assert saved == {torch.float32}
    base_checker(trainable_base)(result.artifact, method)


@pytest.mark.parametrize("method", ["fishmask", "child-tuning"])
def test_methods_training_the_base_weights_refuse_half_precision(
    method: str, trainable_base: Path, tmp_path: Path
) -> None:
    config = TrainConfig(method=method, steps=2, dtype="bfloat16")
    with pytest.raises(InvalidArgument, match=f"^{method} trains the base's own weights, .* with dtype float32$"):
        train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "adapter").exists()


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="dtype must be one of auto, float32, bfloat16, float16"):
        TrainConfig(method="lora", dtype="float8")


def test_cli_dtype_is_recorded_in_the_lineage(
    trainable_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = str(tmp_path / "registry")
    args = ["--registry", reg, "train", "--method", "lora", "--base", str(trainable_base), "--data",
            "builtin:mapping", "--steps", "2", "--quiet"]  # fmt: skip
    assert main([*args, "--dtype", "bfloat16", "--out", str(tmp_path / "a"), "--push", "half"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--push", "auto"]) == 0  # auto: fp32 checkpoint -> float32
    assert "trained lora" in capsys.readouterr().out
    recorded = {name: Registry(reg).resolve(name).lineage.training_config["dtype"] for name in ("half", "auto")}
    assert recorded == {"half": "bfloat16", "auto": "float32"}
    with pytest.raises(SystemExit):
        main([*args, "--dtype", "float8", "--out", str(tmp_path / "c")])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
