"""QLoRA: ``hotswap train --quantize nf4`` trains LoRA over the base quantized at load (PEFT's k-bit preparation),
lowers the eval loss, publishes a PEFT-loadable adapter for the NF4 base (the fingerprint and the lineage name the
quantization), and the engine serves it unmerged on that base beside a float-trained adapter published for it too,
each row equal to its own model; methods with state of their own are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from hotswap.basemodel import fingerprint, load_model
from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import TrainConfig, train

pytest.importorskip("bitsandbytes")

PROMPTS = [[5, 12, 30, 11], [7, 8, 9, 10, 3]]


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.slow
def test_qlora_trains_publishes_and_serves_beside_float_trained_rows(trainable_base: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    config = TrainConfig(method="lora", steps=30, eval_steps=30, quantize="nf4")
    qlora = train(
        config, trainable_base, "builtin:mapping", tmp_path / "q", push="qlora", registry=registry, quiet=True
    )
    m = qlora.metrics
    assert m["eval_loss"] < m["eval_loss_untrained"] - 1.0, m
    assert type(qlora.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert qlora.manifest.base_fingerprint == fingerprint(trainable_base, "nf4")
    assert qlora.manifest.lineage.training_config["quantize"] == "nf4"
    # PEFT loads it on the NF4 base: the trained model's logits
    peft = PeftModel.from_pretrained(load_model(trainable_base, quantize="nf4"), qlora.artifact).eval()
    torch.testing.assert_close(_logits(peft, PROMPTS[0]), _logits(qlora.model, PROMPTS[0]), rtol=0, atol=1e-5)

    # a float-trained LoRA, published for the float base and, to serve beside it, for the NF4 one
    plain = train(TrainConfig(method="lora", steps=3, eval_steps=3), trainable_base, "builtin:mapping",
                  tmp_path / "f", push="plain", registry=registry, quiet=True)  # fmt: skip
    registry.publish(plain.artifact, "plain-nf4", base_fingerprint=fingerprint(trainable_base, "nf4"))
    requests = [
        Request(prompt_ids=PROMPTS[0], adapters=["qlora"]),
        Request(prompt_ids=PROMPTS[1], adapters=["plain-nf4"]),
    ]
    with Engine(trainable_base, registry, max_batch=2, quantize="nf4") as engine:
        ours = engine.forward_logits(requests)
    plain_nf4 = PeftModel.from_pretrained(load_model(trainable_base, quantize="nf4"), plain.artifact).eval()
    for got, model, ids in zip(ours, (qlora.model, plain_nf4), PROMPTS, strict=True):
        want = _logits(model, ids)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_quantized_training_takes_peft_methods_only(trainable_base: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="bitfit trains state of its own"):
        train(TrainConfig(method="bitfit", steps=1, quantize="nf4"), trainable_base, "builtin:mapping", tmp_path / "r")
    with pytest.raises(InvalidArgument, match="quantize must be one of"):
        TrainConfig(method="lora", quantize="int4")
