"""Every tested decoder family runs through its own HF modeling code with hotswap's attention: base rows equal
HF's plain forward, and one mixed batch of LoRA (two: the second, of another rank, on every expert's projections
too on the mixture-of-experts families), DoRA, BitFit, prefix, prompt, FishMask, proxy and base rows equals PEFT's
single-adapter model per row (BitFit: the base with those biases; FishMask: the base with the
sparse delta added; proxy: the proxy-tuned ensemble of the family's own small models, by full forwards). Rows of
different lengths and positions share each batch; the sliding-window families' prompts and generations reach past
their window."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hotswap.basemodel import build_model, fingerprint, load_model, save_model
from hotswap.methods.api import decoder_experts, decoder_linears
from hotswap.methods.proxy.ops_ref import ProxyTuned
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import (
    RandomLoraConfig,
    random_bitfit,
    random_lora,
    random_prefix,
    random_prompt,
    random_proxies,
    random_sparse,
)
from tests.serve.reference import TEST_DEVICE, peft_model, reference_greedy, reference_logits, with_bias_deltas

FAMILIES = ["tiny", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3", "tiny-olmo2",
            "tiny-granite", "tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-olmoe",
            "tiny-gpt-oss"]  # fmt: skip
WINDOW = 8  # the tiny presets' sliding window
PROMPTS = [[(5 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([3, 13, 21, 1, 6, 17, 4, 9, 11])]
ROWS = [
    "lora",
    "dora",
    "bitfit",
    "prefix",
    "prompt",
    "fishmask",
    "proxy",
    None,
    "lora2",
]  # one prompt each; None = base
NEW = 8


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """(base, adapter name -> artifact) for one family, and a running engine holding those adapters."""
    d = tmp_path_factory.mktemp(request.param)
    base = save_model(build_model(request.param, seed=0, initializer_range=0.1), d / "base")
    model = load_model(base)
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in decoder_linears(model)}))
    experts = bool(decoder_experts(model))
    adapters = {
        "lora": random_lora(base, d / "lora", RandomLoraConfig(rank=4, seed=1, init_std=0.2, target_modules=targets)),
        "lora2": random_lora(  # PEFT's target_parameters: a LoRA per expert (none on a dense base)
            base,
            d / "lora2",
            RandomLoraConfig(
                rank=2,
                seed=8,
                init_std=0.2,
                target_modules=("o_proj",),
                target_parameters=("experts",) if experts else (),
            ),
        ),
        "dora": random_lora(
            base, d / "dora", RandomLoraConfig(rank=4, seed=2, init_std=0.2, target_modules=targets, use_dora=True)
        ),
        "bitfit": random_bitfit(base, d / "bitfit", targets, seed=3, std=0.2),
        "prefix": random_prefix(base, d / "prefix", num_virtual_tokens=5, seed=4),
        "prompt": random_prompt(base, d / "prompt", num_virtual_tokens=3, seed=5),
        "fishmask": random_sparse(base, d / "fishmask", "fishmask", density=0.05, seed=6, std=0.3),
        "proxy": random_proxies(base, {d / "proxy": 7}, alpha=1.5, std=0.3)[0],  # the family's own models
    }
    registry = Registry(d / "registry")
    for name, path in adapters.items():
        registry.publish(path, name, base_fingerprint=fingerprint(base))
    requests = [
        Request(prompt_ids=p, adapters=[a] if a else [], max_new_tokens=NEW, ignore_eos=True)
        for p, a in zip(PROMPTS, ROWS, strict=True)
    ]
    with Engine(
        base, registry, max_batch=len(ROWS), max_resident=len(ROWS), max_seq_len=64, dtype="float32", device=TEST_DEVICE
    ) as engine:
        logits = [x.cpu() for x in engine.forward_logits(requests)]
        tokens = [r.token_ids for r in engine.generate(requests)]
    yield base, {"adapters": adapters, "logits": logits, "tokens": tokens}


def _bitfit_model(base: Path, adapter: Path) -> torch.nn.Module:
    return with_bias_deltas(load_model(base), adapter)


def _sparse_model(base: Path, adapter: Path) -> torch.nn.Module:
    """The base with the adapter's sparse delta added to its weights."""
    model = load_model(base)
    tensors = load_file(adapter / "adapter_model.safetensors")
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".weight.indices")]:
            module = key.removesuffix(".weight.indices")
            model.get_submodule(module).weight.view(-1)[tensors[key]] += tensors[f"{module}.weight.values"]
    return model


def _proxy_model(base: Path, adapter: Path) -> torch.nn.Module:
    alpha = json.loads((adapter / "hotswap_config.json").read_text())["alpha"]
    return ProxyTuned(load_model(base), load_model(adapter / "expert"), load_model(adapter / "anti_expert"), alpha)


REFERENCES = {None: lambda base, _: load_model(base), "bitfit": _bitfit_model, "fishmask": _sparse_model,
              "proxy": _proxy_model}  # fmt: skip


@pytest.mark.parametrize("row", range(len(ROWS)), ids=[r or "base" for r in ROWS])
def test_row_matches_its_reference(family: tuple[Path, dict], row: int) -> None:
    base, run = family
    name, ids = ROWS[row], PROMPTS[row]
    adapter = run["adapters"].get(name)
    model = REFERENCES.get(name, peft_model)(base, adapter).to(TEST_DEVICE)
    ref = reference_logits(model, ids)
    if name is not None:
        assert (ref - reference_logits(load_model(base), ids)).abs().max() > 1e-2, "the adapter must change the output"
    assert (run["logits"][row] - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert run["tokens"][row] == reference_greedy(model, ids, NEW)


def test_long_rows_reach_past_the_sliding_window() -> None:
    """The test's own premise: the longest row ends past the tiny window, so windowed layers mask something."""
    assert max(len(p) for p in PROMPTS) + NEW > 2 * WINDOW
