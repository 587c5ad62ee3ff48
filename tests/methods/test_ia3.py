"""IA³, the method added as one folder: its batched op against the row-loop reference, training through PEFT,
and the trained artifact served per row equal to PEFT's own IA³ model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotswap.basemodel import fingerprint, load_model
from hotswap.methods.api import BatchPlan, LinearDelta
from hotswap.methods.ia3.kind import IA3Vector
from hotswap.methods.ia3.ops_ref import ia3_linear
from hotswap.methods.lora.kind import LoraFactors
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.serve.model.layers import MultiAdapterLinear
from hotswap.train import TrainConfig, train
from tests.serve.reference import peft_model, reference_greedy, reference_logits

IN, OUT, SLOTS = 24, 20, 6


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("tokens", [1, 5])
def test_batched_ia3_matches_the_row_loop(k: int, tokens: int) -> None:
    """Input-side and output-side vectors, composed with weights, beside rows without adapters and a LoRA slot."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(IN, OUT)
    layer = MultiAdapterLinear(base, BatchPlan(), SLOTS, base.weight.dtype)
    vectors = {}
    for slot in range(1, SLOTS):
        feedforward = slot % 2 == 0
        scale = 1 + 0.5 * torch.randn(IN if feedforward else OUT, generator=g)
        vectors[slot] = (scale, feedforward)
        layer.set_slot(slot, LinearDelta({"ia3": IA3Vector(scale, feedforward)}))
    layer.set_slot(SLOTS, LinearDelta({"lora": LoraFactors(torch.zeros(2, IN), torch.zeros(2, OUT))}))
    rows = 8
    slots = torch.randint(0, SLOTS + 1, (rows, k), generator=g)
    weights = torch.tensor([1.0, 0.5, -1.0][:k]).repeat(rows, 1)
    plan = [[(int(s), float(w)) for s, w in zip(sr, wr, strict=True)] for sr, wr in zip(slots, weights, strict=True)]
    layer.plan.set(plan, torch.device("cpu"))
    x = torch.randn(rows, tokens, IN, generator=g)
    with torch.no_grad():
        fast = layer(x)
    ref = ia3_linear(x, base, vectors, slots, weights)
    assert (fast - ref).abs().max() <= 1e-5 * (ref.abs().max() + 1)


def test_trained_ia3_serves_equal_to_peft(tiny_base: Path, tmp_path: Path) -> None:
    """hotswap train --method ia3 through PEFT, published; the engine's row (beside a base row and a LoRA row)
    equals PEFT's IA3 model, logits and greedy tokens."""
    result = train(
        TrainConfig(method="ia3", steps=40, batch_size=8, eval_steps=20, lr=0.3),
        tiny_base,
        "builtin:mapping",
        tmp_path / "run",
        push="tuned",
        registry=tmp_path / "registry",
        quiet=True,
    )
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_untrained"]
    reg = Registry(tmp_path / "registry")
    assert reg.resolve("tuned").method == "ia3"
    ids = [5, 17, 99, 3, 42, 7]
    model = peft_model(tiny_base, result.artifact)
    ref = reference_logits(model, ids)
    assert (ref - reference_logits(load_model(tiny_base), ids)).abs().max() > 1e-2
    from hotswap.methods.lora import RandomLoraConfig, random_lora

    lora = random_lora(tiny_base, tmp_path / "lora", RandomLoraConfig(rank=4, seed=3, init_std=0.2))
    reg.publish(lora, "lora", base_fingerprint=fingerprint(tiny_base))
    with Engine(tiny_base, reg, max_batch=4) as engine:
        reqs = [
            Request(prompt_ids=ids, adapters=a, max_new_tokens=6, ignore_eos=True) for a in (["tuned"], [], ["lora"])
        ]
        ours = engine.forward_logits(reqs)[0]
        tokens = engine.generate(reqs)[0].token_ids
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert tokens == reference_greedy(model, ids, 6)
