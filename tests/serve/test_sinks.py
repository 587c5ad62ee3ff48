"""gpt-oss's attention sinks through the engine: base rows of one mixed batch equal HF's plain (eager) forward and
its greedy tokens, LoRA rows on the attention linears equal PEFT's single-adapter model, on the static and the paged
KV cache, with prefix-cache hits and with the static decode (traced whole: the sinks add no host sync). Prompts and
generations reach past the sliding window of alternate layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotswap.basemodel import build_model, fingerprint, load_model, save_model
from hotswap.registry import Registry
from hotswap.serve import Engine, EngineObserver, Request
from hotswap.train import RandomLoraConfig, random_lora
from tests.serve.reference import TEST_DEVICE, peft_model, reference_greedy, reference_logits

WINDOW = 8  # tiny-gpt-oss's sliding window (its sliding layers alternate with full ones)
PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([3, 13, 21, 1, 6, 17])]
ROWS = [None, "lora", None, "lora", "lora", None]  # one prompt each; None = base
NEW = 8
CONFIGS = {
    "static-cache": dict(kv_block_size=0),
    "paged-prefix": dict(kv_block_size=4, prefix_cache=True),
    "paged-static-decode": dict(kv_block_size=4, prefix_cache=True, decode="static"),
}


class _Hits(EngineObserver):
    def __init__(self) -> None:
        self.tokens = 0

    def prefix_hit(self, adapters: list[tuple[str, float]], tokens: int) -> None:
        self.tokens += tokens


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(base, registry, reference logits and greedy tokens per row) for tiny-gpt-oss and a LoRA on q/k/v/o_proj."""
    d = tmp_path_factory.mktemp("gpt-oss")
    base = save_model(build_model("tiny-gpt-oss", seed=0, initializer_range=0.1), d / "base")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora = random_lora(base, d / "lora", RandomLoraConfig(rank=4, seed=1, init_std=0.2, target_modules=targets))
    Registry(d / "registry").publish(lora, "lora", base_fingerprint=fingerprint(base))
    models = {None: load_model(base).to(TEST_DEVICE), "lora": peft_model(base, lora)}
    assert models[None].config._attn_implementation == "eager", "the oracle is gpt-oss's own eager attention"
    refs = {
        "logits": [reference_logits(models[name], ids) for name, ids in zip(ROWS, PROMPTS, strict=True)],
        "tokens": [reference_greedy(models[name], ids, NEW) for name, ids in zip(ROWS, PROMPTS, strict=True)],
    }
    return base, d / "registry", refs


@pytest.mark.parametrize("setup", list(CONFIGS))
def test_rows_equal_hf_and_peft(gpt_oss: tuple[Path, Path, dict], setup: str) -> None:
    base, registry, refs = gpt_oss
    requests = [
        Request(prompt_ids=p, adapters=[a] if a else [], max_new_tokens=NEW, ignore_eos=True)
        for p, a in zip(PROMPTS, ROWS, strict=True)
    ]
    hits = _Hits()
    with Engine(base, registry, max_batch=len(ROWS), max_resident=2, max_seq_len=64, dtype="float32",
                device=TEST_DEVICE, observer=hits, **CONFIGS[setup]) as engine:  # fmt: skip
        static = engine.runner.static
        if static is not None:  # traced whole by dynamo (no compiler): a host sync in the step would break it
            torch._dynamo.reset()
            static._forward = torch.compile(static._step, backend="eager", fullgraph=True, dynamic=False)
        logits = [x.cpu() for x in engine.forward_logits(requests)]
        runs = [[r.token_ids for r in engine.generate(requests)] for _ in range(2)]  # the second hits cached blocks
    for ours, ref in zip(logits, refs["logits"], strict=True):
        assert (ours - ref).abs().max() <= 1e-4
    assert runs[0] == runs[1] == refs["tokens"]
    assert (hits.tokens > 0) == CONFIGS[setup].get("prefix_cache", False)
    if static is not None:
        assert static.steps and static.eager_steps == 0, "every full decode step was the static one"


def test_premises(gpt_oss: tuple[Path, Path, dict]) -> None:
    """The sinks and the adapter change the output, and the long rows reach past the window."""
    base, _, refs = gpt_oss
    model = load_model(base)
    for layer in model.model.layers:
        layer.self_attn.sinks.fill_(-1e9)  # no sink: plain softmax attention
    ids = PROMPTS[ROWS.index(None)]
    assert (reference_logits(model, ids) - refs["logits"][0]).abs().max() > 1e-2
    row = ROWS.index("lora")
    assert (reference_logits(load_model(base), PROMPTS[row]) - refs["logits"][row]).abs().max() > 1e-2
    assert max(len(p) for p in PROMPTS) + NEW > 2 * WINDOW
