"""A PEFT adapter survives publish -> pull bit for bit: PeftModel.from_pretrained gives the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hotswap.basemodel import fingerprint, load_model
from hotswap.errors import BaseModelMismatch
from hotswap.registry import Registry
from hotswap.train import RandomLoraConfig, random_lora

IDS = torch.tensor([[5, 17, 99, 3, 42, 7], [1, 2, 3, 4, 5, 6]])


def test_peft_lora_round_trip_through_registry(tiny_base: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_model(tiny_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():  # PEFT initialises B = 0; make the delta real
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        expected = peft_model(IDS).logits
        base_logits = load_model(tiny_base)(IDS).logits
    assert (expected - base_logits).abs().max() > 1e-3, "adapter must change the output"
    peft_model.save_pretrained(tmp_path / "adapter")

    reg = Registry(tmp_path / "registry")
    fp = fingerprint(tiny_base)
    published = reg.publish(tmp_path / "adapter", "math", base_fingerprint=fp, aliases=["prod"])
    assert published.method == "lora"
    reg.pull("math:prod", tmp_path / "pulled")

    loaded = PeftModel.from_pretrained(load_model(tiny_base), tmp_path / "pulled")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)


def test_random_dora_artifact_loads_in_peft_and_is_refused_on_other_base(
    tiny_base: Path, other_base: Path, tmp_path: Path
) -> None:
    out = random_lora(tiny_base, tmp_path / "dora", RandomLoraConfig(rank=4, use_dora=True, seed=3))
    reg = Registry(tmp_path / "registry")
    reg.publish(out, "tone", base_fingerprint=fingerprint(tiny_base))
    manifest, path = reg.fetch("tone", base_fingerprint=fingerprint(tiny_base))
    assert manifest.method == "dora"
    model = PeftModel.from_pretrained(load_model(tiny_base), path)
    with torch.no_grad():
        delta = (model(IDS).logits - load_model(tiny_base)(IDS).logits).abs().max()
    assert delta > 1e-3
    with pytest.raises(BaseModelMismatch):
        reg.fetch("tone", base_fingerprint=fingerprint(other_base))
