"""PLoRA: the offload arithmetic exactly, the published delta reproduces the trained model (PEFT and
the engine), SVD export records its energy, and at a too-small rank PLoRA beats LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from hotswap.basemodel import load_model
from hotswap.errors import InvalidArgument
from hotswap.methods.plora.train import PLoraOptions, offload
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import TrainConfig, train

PROBE = [[5, 12], [5, 30, 11], [7, 8, 9, 10]]


def _layer(trainable_base: Path) -> LoraLayer:
    model = get_peft_model(load_model(trainable_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g))
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    return layer


@pytest.mark.parametrize("m", [0.0, 0.3])
def test_offload_arithmetic(trainable_base: Path, m: float) -> None:
    layer = _layer(trainable_base)
    a = layer.lora_A["default"].weight.detach().clone()
    b = layer.lora_B["default"].weight.detach().clone()
    w = layer.get_base_layer().weight.detach().clone()
    s = layer.scaling["default"]
    assert s == 2.0
    part_b, part_a = offload(layer, "default", m)
    assert torch.equal(layer.get_base_layer().weight, w + (1 - m) * s * (b @ a))  # exactly
    torch.testing.assert_close(part_b @ part_a, (1 - m) * s * (b @ a))  # the factors kept for export
    if m == 0:
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # restart: B = 0 ...
        assert not torch.equal(layer.lora_A["default"].weight, a)  # ... and A re-initialised
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    else:
        assert torch.equal(layer.lora_A["default"].weight, m * a)
        assert torch.equal(layer.lora_B["default"].weight, m * b)


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize(("options", "rank"), [({"momentum": 0.5}, 4 * 4), ({"export": "svd", "svd_rank": 6}, 6)])
def test_published_delta_reproduces_the_trained_model(
    trainable_base: Path, tmp_path: Path, options: dict, rank: int
) -> None:
    config = TrainConfig(method="plora", options={"rank": 4, "period": 20, **options}, steps=60, eval_steps=30)
    result = train(config, trainable_base, "builtin:mapping", tmp_path / "run", push="p", registry=tmp_path / "reg",
                   quiet=True)  # fmt: skip
    m = result.metrics
    assert m["plora_offloads"] == 3 and m["plora_exported_rank"] == rank  # 3 offloads + the live factors
    assert m["eval_loss"] < m["eval_loss_untrained"] - 0.5
    manifest = Registry(tmp_path / "reg").resolve("p")
    assert manifest.method == "plora" and manifest.lineage.training_config["options"]["period"] == 20
    loaded = PeftModel.from_pretrained(load_model(trainable_base), result.artifact).eval()
    with Engine(trainable_base, tmp_path / "reg", max_batch=4, max_seq_len=32) as engine:
        served = engine.forward_logits([Request(prompt_ids=ids, adapters=["p"]) for ids in PROBE])
    tol = 1e-4 if "svd_rank" not in options else None
    for ids, ours in zip(PROBE, served, strict=True):
        trained = _logits(result.model, ids)
        if tol is not None:  # stacked: exact up to float rounding
            torch.testing.assert_close(_logits(loaded, ids), trained, rtol=0, atol=tol)
            torch.testing.assert_close(ours, trained, rtol=0, atol=tol)
        else:  # truncated: PEFT and the engine agree with each other, and the energy is recorded
            torch.testing.assert_close(ours, _logits(loaded, ids), rtol=0, atol=1e-4)
    if "svd_rank" in options:
        assert 0 < manifest.metrics["svd_energy_kept_min"] <= 1


def test_plora_beats_lora_at_a_too_small_rank(trainable_base: Path, tmp_path: Path) -> None:
    """Same rank 1, same steps: the accumulated update of PLoRA reaches higher rank than LoRA's."""
    common = {"steps": 300, "eval_steps": 300, "seed": 0}
    targets = {"target_modules": ("down_proj",)}
    lora = train(TrainConfig(method="lora", options={"rank": 1, **targets}, **common), trainable_base,
                 "builtin:mapping", tmp_path / "lora", quiet=True)  # fmt: skip
    plora = train(TrainConfig(method="plora", options={"rank": 1, "period": 30, **targets}, **common),
                  trainable_base, "builtin:mapping", tmp_path / "plora", quiet=True)  # fmt: skip
    assert plora.metrics["eval_loss"] < lora.metrics["eval_loss"] - 0.1, (plora.metrics, lora.metrics)


def test_options_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="momentum"):
        PLoraOptions(momentum=1.0)
    with pytest.raises(InvalidArgument, match="export"):
        PLoraOptions(export="zip")
    with pytest.raises(InvalidArgument, match="svd_rank"):
        PLoraOptions(svd_rank=3)
