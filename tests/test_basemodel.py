from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotswap.basemodel import build_model, fingerprint, load_model, save_model
from hotswap.errors import InvalidBaseModel


def test_same_seed_same_weights_and_fingerprint(tiny_base: Path, tmp_path: Path) -> None:
    again = save_model(build_model("tiny", seed=0), tmp_path / "again")
    assert fingerprint(again) == fingerprint(tiny_base)
    assert fingerprint(tiny_base).startswith("hsfp1:")


def test_fingerprint_differs_for_other_weights(tiny_base: Path, other_base: Path) -> None:
    assert fingerprint(tiny_base) != fingerprint(other_base)


def test_fingerprint_sees_a_single_changed_weight(tiny_base: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[3]
    tensors[name].view(-1)[7] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    assert fingerprint(copy) != fingerprint(tiny_base)


def test_fingerprint_ignores_write_time_config_keys_but_not_real_ones(tiny_base: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint(copy) == fingerprint(tiny_base)
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint(copy) != fingerprint(tiny_base)


def test_fingerprint_independent_of_tensor_order_in_file(tiny_base: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    tensors = load_file(copy / "model.safetensors")
    # Re-save as two shards in a different order: same checkpoint, same fingerprint.
    names = sorted(tensors, reverse=True)
    (copy / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:5]}, copy / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, copy / "model-00002-of-00002.safetensors")
    assert fingerprint(copy) == fingerprint(tiny_base)


def test_load_model_is_frozen_eval_and_matches_saved(tiny_base: Path) -> None:
    model = load_model(tiny_base)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    ref = build_model("tiny", seed=0)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_not_a_checkpoint_is_refused(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.raises(InvalidBaseModel, match=r"no config\.json"):
        fingerprint(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_base / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04whatever")
    with pytest.raises(InvalidBaseModel, match="safetensors"):
        load_model(pickled)


def test_unknown_preset_and_existing_output(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.raises(InvalidBaseModel, match="unknown base preset"):
        build_model("gpt-17")
    with pytest.raises(InvalidBaseModel, match="already exists"):
        save_model(build_model("tiny"), tiny_base)


def test_smollm2_preset_has_the_benchmark_shape() -> None:
    with torch.device("meta"):
        model = build_model("smollm2-135m")
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000
    assert model.config.tie_word_embeddings
