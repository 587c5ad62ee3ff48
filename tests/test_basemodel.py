from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotswap.basemodel import SAFE_INDEX, build_model, fingerprint, load_model, save_model
from hotswap.errors import InvalidBaseModel


def test_same_seed_same_weights_and_fingerprint(tiny_base: Path, tmp_path: Path) -> None:
    again = save_model(build_model("tiny", seed=0), tmp_path / "again")
    assert fingerprint(again) == fingerprint(tiny_base)
    assert fingerprint(tiny_base).startswith("hsfp1:")


def test_saved_checkpoints_are_readable_by_other_users(tiny_base: Path) -> None:
    """A server often runs as another user than whoever built or imported its base (the image's uid 1000)."""
    assert oct(tiny_base.stat().st_mode & 0o777) == oct(0o755)
    assert {oct(f.stat().st_mode & 0o777) for f in tiny_base.iterdir()} == {oct(0o644)}


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
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, copy / file)
    with pytest.raises(InvalidBaseModel, match=re.escape(f"no model.safetensors or {SAFE_INDEX}")):
        fingerprint(copy)  # shards without their index are not a checkpoint transformers can load
    _write_index(copy, shards)
    assert fingerprint(copy) == fingerprint(tiny_base)


def _write_index(d: Path, shards: dict[str, list[str]]) -> None:
    weight_map = {name: file for file, names in shards.items() for name in names}
    (d / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sharded_checkpoint_loads_and_fingerprints_like_the_unsharded_one(tmp_path: Path, tied: bool) -> None:
    model = build_model("tiny", seed=0, tie_word_embeddings=tied)
    one = save_model(model, tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # as hub checkpoints are saved
    sharded = tmp_path / "sharded"
    weight_map = json.loads((sharded / SAFE_INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and not (sharded / "model.safetensors").exists()
    assert ("lm_head.weight" in weight_map) is not tied  # a tied head is not saved
    assert fingerprint(sharded) == fingerprint(one)
    a, b = load_model(sharded), load_model(one)
    assert (a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()) is tied
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert torch.equal(a(ids).logits, model(ids).logits)


def test_fingerprint_reads_only_the_weights_transformers_loads(tiny_base: Path, tmp_path: Path) -> None:
    # hub repos often hold other safetensors beside the model's (e.g. mistral's consolidated.safetensors)
    stray = {"layers.0.attention.wq.weight": torch.ones(4, 4)}
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    save_file(stray, copy / "consolidated.safetensors")
    assert fingerprint(copy) == fingerprint(tiny_base)
    build_model("tiny", seed=0).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    before = fingerprint(tmp_path / "sharded")
    save_file(stray, tmp_path / "sharded" / "consolidated.safetensors")
    assert fingerprint(tmp_path / "sharded") == before == fingerprint(tiny_base)


def test_broken_sharded_checkpoints_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good"
    build_model("tiny", seed=0).save_pretrained(good, max_shard_size="100KB")
    index = json.loads((good / SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))

    def broken(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    partial = broken("partial")
    (partial / shards[-1]).unlink()  # an interrupted download
    for check in (fingerprint, load_model):
        with pytest.raises(InvalidBaseModel, match=re.escape(f"shard {shards[-1]} named by {SAFE_INDEX} is missing")):
            check(partial)
    moved = broken("moved")
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    (moved / SAFE_INDEX).write_text(json.dumps({"weight_map": {**index["weight_map"], name: shards[1]}}))
    with pytest.raises(InvalidBaseModel, match=re.escape(f"puts {name} in {shards[1]}, which lacks it")):
        fingerprint(moved)
    escaping = broken("escaping")
    (escaping / SAFE_INDEX).write_text(json.dumps({"weight_map": {name: "../good/" + shards[0]}}))
    with pytest.raises(InvalidBaseModel, match=r"is not a \.safetensors file name"):
        fingerprint(escaping)
    garbled = broken("garbled")
    (garbled / SAFE_INDEX).write_text('{"weight_map": ')
    with pytest.raises(InvalidBaseModel, match="not a safetensors index"):
        fingerprint(garbled)


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
