"""DyLoRA: trained with nested ranks, every truncation works, and the engine serves a request at a
chosen rank with exactly the truncated adapter's logits (independent reference: PEFT at rank b)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from hotswap.basemodel import load_model
from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import TrainConfig, TrainResult, evaluate, train
from hotswap.train.data import builtin

PROBE = [[5, 12], [5, 30, 11], [7, 8, 9, 10]]
R = 8


@pytest.fixture(scope="module")
def dylora_run(trainable_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path]:
    root = tmp_path_factory.mktemp("dylora")
    config = TrainConfig(method="dylora", options={"rank": R}, steps=200, eval_steps=100)
    result = train(
        config, trainable_base, "builtin:mapping", root / "run", push="dy", registry=root / "reg", quiet=True
    )
    fp = result.manifest.base_fingerprint  # type: ignore[union-attr]
    Registry(root / "reg").publish(result.artifact, "plain", method="lora", base_fingerprint=fp)  # served as LoRA
    return result, root / "reg"


def _truncated(artifact: Path, b: int, out: Path) -> Path:
    """The adapter cut to its first b components as an ordinary PEFT LoRA of rank b (same alpha)."""
    out.mkdir()
    config = json.loads((artifact / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "r": b}))
    tensors = load_file(artifact / "adapter_model.safetensors")
    cut = {k: (t[:b] if ".lora_A." in k else t[:, :b]).contiguous() for k, t in tensors.items()}
    save_file(cut, out / "adapter_model.safetensors")
    return out


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_every_truncation_works(dylora_run: tuple[TrainResult, Path], trainable_base: Path, tmp_path: Path) -> None:
    result, _ = dylora_run
    eval_ds = builtin("mapping", 128, 10_000)
    untrained = result.metrics["eval_loss_untrained"]
    losses = {}
    for b in (1, 2, 4, R):
        model = PeftModel.from_pretrained(load_model(trainable_base), _truncated(result.artifact, b, tmp_path / str(b)))
        losses[b] = evaluate(model.eval(), eval_ds, 32, "cpu")[0]
    assert all(loss < untrained - 0.5 for loss in losses.values()), (untrained, losses)
    assert losses[R] == pytest.approx(result.metrics["eval_loss"], abs=1e-4)  # eval runs at the full rank


def test_engine_serves_chosen_ranks_in_one_batch(
    dylora_run: tuple[TrainResult, Path], trainable_base: Path, tmp_path: Path
) -> None:
    result, registry = dylora_run
    ranks = [None, 1, 3, R, 100]  # None and >= r: the full adapter
    with Engine(trainable_base, registry, max_batch=32, max_seq_len=32) as engine:
        requests = [Request(prompt_ids=ids, adapters=["dy"], rank=b) for b in ranks for ids in PROBE]
        requests += [Request(prompt_ids=ids, adapters=["plain"]) for ids in PROBE]  # LoRA rows alongside
        served = engine.forward_logits(requests)
        with pytest.raises(InvalidArgument, match="DyLoRA adapters only"):
            engine.submit(Request(prompt_ids=[5], adapters=["plain"], rank=2))
        generated = engine.generate([Request(prompt_ids=[5, 12], adapters=["dy"], rank=3, max_new_tokens=4)])[0]
    references = {}
    for b in ranks:
        cut = min(b or R, R)
        if cut not in references:
            path = _truncated(result.artifact, cut, tmp_path / f"r{cut}")
            references[cut] = PeftModel.from_pretrained(load_model(trainable_base), path).eval()
    expected = [_logits(references[min(b or R, R)], ids) for b in ranks for ids in PROBE]
    expected += [_logits(references[R], ids) for ids in PROBE]
    for got, want in zip(served, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.allclose(served[len(PROBE)], served[0])  # rank 1 differs from the full adapter
    greedy = references[3]
    ids = [5, 12]
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(greedy(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert generated.token_ids == ids[2:]
