"""One mixed batch holding every PEFT method: each row equals PEFT's own single-adapter model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotswap.basemodel import load_model
from hotswap.serve import Engine, Request
from tests.serve.reference import peft_model, reference_greedy, reference_logits

PEFT_METHODS = ["lora4", "lora8qv", "pattern", "rslora", "dropout", "dora", "prefix", "prompt", "ia3"]
PROMPTS = {name: [(7 * i + 3 * j) % 250 + 1 for j in range(3 + i)] for i, name in enumerate([*PEFT_METHODS, "base"])}


@pytest.fixture(scope="module")
def mixed(engine: Engine) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """name -> (prompt logits, 6 greedy tokens), all rows computed together in one batch."""
    names = [*PEFT_METHODS, "base"]
    requests = [
        Request(prompt_ids=PROMPTS[n], adapters=[] if n == "base" else [n], max_new_tokens=6, ignore_eos=True)
        for n in names
    ]
    logits = engine.forward_logits(requests)
    results = engine.generate(requests)
    return {n: (lg, r.token_ids) for n, lg, r in zip(names, logits, results, strict=True)}


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_row_matches_peft_single_adapter(name: str, mixed: dict, adapters: dict[str, Path], tiny_base: Path) -> None:
    model = peft_model(tiny_base, adapters[name])
    ids = PROMPTS[name]
    ref = reference_logits(model, ids)
    ours, tokens = mixed[name]
    base = reference_logits(load_model(tiny_base), ids)
    assert (ref - base).abs().max() > 1e-2, "the adapter must visibly change the output"
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert tokens == reference_greedy(model, ids, 6)


def test_base_row_matches_the_plain_model(mixed: dict, tiny_base: Path) -> None:
    model = load_model(tiny_base)
    ours, tokens = mixed["base"]
    ref = reference_logits(model, PROMPTS["base"])
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert tokens == reference_greedy(model, PROMPTS["base"], 6)


def test_same_adapter_alone_and_in_the_mix_agree(mixed: dict, engine: Engine) -> None:
    for name in ("dora", "prefix", "prompt"):
        alone = engine.forward_logits([Request(prompt_ids=PROMPTS[name], adapters=[name])])[0]
        assert (alone - mixed[name][0]).abs().max() <= 1e-5
