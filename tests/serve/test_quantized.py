"""Quantized bases (``quantize``: bitsandbytes NF4/FP4/int8, torchao int8 weight-only) with unmerged adapters:
LoRA, DoRA, IA3, BitFit and prefix rows with base rows in one batch equal PEFT's single-adapter model on the same
quantized base (BitFit: that base with the bias deltas), greedy tokens equal; every served method's rows on a
weight-only quantized base equal its rows on a float checkpoint of the dequantized weights; the fingerprint names
the quantization, so an adapter published for the float base is refused on the quantized one and the other way
round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from hotswap.basemodel import fingerprint, load_model, save_model
from hotswap.cli import main
from hotswap.errors import BaseModelMismatch, InvalidBaseModel
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from tests.serve.reference import reference_greedy, reference_logits, with_bias_deltas

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

ROWS = ["lora4", "dora", "ia3", "bitfit", "prefix", None]
PROMPTS = [[(7 * i + 3 * j) % 200 + 5 for j in range(4 + 2 * i)] for i in range(len(ROWS))]
NEW = 4


def _reference(base: Path, quantize: str, name: str | None, adapter: Path | None) -> torch.nn.Module:
    model = load_model(base, quantize=quantize)
    if name is None:
        return model
    if name == "bitfit":
        return with_bias_deltas(model, adapter)
    return PeftModel.from_pretrained(model, adapter).eval()


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8", "torchao-int8"])
def test_quantized_rows_equal_peft_on_the_same_quantized_base(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path, quantize: str
) -> None:
    registry = Registry(tmp_path / "registry")
    for name in filter(None, ROWS):  # published for the quantized base
        registry.publish(adapters[name], name, base_fingerprint=fingerprint(tiny_base, quantize))
    requests = [
        Request(prompt_ids=p, adapters=[a] if a else [], max_new_tokens=NEW, ignore_eos=True)
        for p, a in zip(PROMPTS, ROWS, strict=True)
    ]
    with Engine(tiny_base, registry, max_batch=len(ROWS), max_resident=len(ROWS), max_seq_len=64,
                quantize=quantize) as engine:  # fmt: skip
        logits = engine.forward_logits(requests)
        tokens = [r.token_ids for r in engine.generate(requests)]
    for name, ids, ours, toks in zip(ROWS, PROMPTS, logits, tokens, strict=True):
        model = _reference(tiny_base, quantize, name, adapters.get(name))
        ref = reference_logits(model, ids)
        assert (
            (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
        )  # as on float bases: the same quantized modules, deltas in float32, name
        if (quantize, name) == ("int8", "dora"):
            # PEFT 0.21's DoRA dequantizes an LLM.int8 layer in place, which fails the layer's next forward: the
            # reference is rebuilt for each token
            seq = list(ids)
            for _ in range(NEW):
                seq.append(
                    int(reference_logits(_reference(tiny_base, quantize, name, adapters[name]), seq)[-1].argmax())
                )
            assert toks == seq[len(ids) :], name
        else:
            assert toks == reference_greedy(model, ids, NEW), name


EVERY = ["lora4", "dora", "bitfit", "prefix", "prompt", "fishmask", "bottleneck", "ia3", "proxy", "lora8qv", None]


@pytest.mark.parametrize("quantize", ["nf4", "torchao-int8"])
def test_every_method_on_a_weight_only_quantized_base_equals_it_on_the_dequantized_weights(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path, quantize: str
) -> None:
    """Weight-only quantization computes the base product from the dequantized weights, so every method's rows on
    the quantized base equal its rows on a float checkpoint of those weights (checked against PEFT and the
    methods' references by the float tests)."""
    model = load_model(tiny_base, quantize=quantize)
    dense = save_model(model.dequantize() if quantize == "nf4" else _torchao_dense(model), tmp_path / "dense")
    registry = Registry(tmp_path / "registry")
    for name in filter(None, EVERY):
        for base, q in ((tiny_base, quantize), (dense, None)):
            registry.publish(adapters[name], f"{name}-{q or 'dense'}", base_fingerprint=fingerprint(base, q))
    prompts = [[(5 * i + 3 * j) % 200 + 5 for j in range(3 + 2 * i)] for i in range(len(EVERY))]

    def requests(suffix: str) -> list[Request]:
        return [Request(prompt_ids=p, adapters=[f"{a}-{suffix}"] if a else [], max_new_tokens=NEW, ignore_eos=True)
                for p, a in zip(prompts, EVERY, strict=True)]  # fmt: skip

    runs = []
    for base, q in ((tiny_base, quantize), (dense, "none")):
        with Engine(base, registry, max_batch=len(EVERY), max_resident=len(EVERY), max_seq_len=64,
                    quantize=q) as engine:  # fmt: skip
            reqs = requests(quantize if q != "none" else "dense")
            runs.append((engine.forward_logits(reqs), [r.token_ids for r in engine.generate(reqs)]))
    (quantized, q_tokens), (ref, ref_tokens) = runs
    for name, ours, want in zip(EVERY, quantized, ref, strict=True):
        assert (ours - want).abs().max() <= 1e-4 * want.abs().max(), name
    assert q_tokens == ref_tokens


def _torchao_dense(model: torch.nn.Module) -> torch.nn.Module:
    """A float copy of a torchao-quantized model: each quantized weight dequantized."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight).__module__.startswith("torchao."):
            module.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
    del model.config.quantization_config
    model.hf_quantizer = None
    return model


def test_an_adapter_is_served_on_the_base_it_was_published_for(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(adapters["lora4"], "float-trained", base_fingerprint=fingerprint(tiny_base))
    push = ["push", str(adapters["lora4"]), "--name", "nf4-trained", "--base", str(tiny_base), "--quantize", "nf4"]
    assert main([*push, "--registry", str(tmp_path / "registry")]) == 0
    assert registry.resolve("nf4-trained").base_fingerprint == fingerprint(tiny_base, "nf4")
    assert fingerprint(tiny_base, "nf4") != fingerprint(tiny_base, "fp4") != fingerprint(tiny_base)
    with Engine(tiny_base, registry, max_batch=2, quantize="nf4") as engine:
        engine.load_adapter("nf4-trained")
        with pytest.raises(BaseModelMismatch):
            engine.load_adapter("float-trained")
    with Engine(tiny_base, registry, max_batch=2) as engine:
        engine.load_adapter("float-trained")
        with pytest.raises(BaseModelMismatch):
            engine.load_adapter("nf4-trained")


@pytest.mark.parametrize(("quantize", "layer"), [("nf4", "Linear4bit"), ("torchao-int8", "Int8Tensor")])
def test_a_quantized_checkpoint_loads_and_serves_as_it_is(
    tiny_base: Path, tmp_path: Path, quantize: str, layer: str
) -> None:
    """Saved quantized (bitsandbytes, torchao: safetensors), it loads as it is, refuses a second quantization, and
    the engine serves it (its own fingerprint: the config carries the quantization)."""
    base = tmp_path / "prequantized"
    quantized = load_model(tiny_base, quantize=quantize)
    quantized.save_pretrained(base)
    with pytest.raises(InvalidBaseModel, match="already quantized"):
        load_model(base, quantize="int8")
    model = load_model(base)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert layer in (type(q_proj).__name__, type(q_proj.weight).__name__)
    assert fingerprint(base) not in (fingerprint(tiny_base), fingerprint(tiny_base, quantize))
    ids = PROMPTS[1]
    with Engine(base, tmp_path / "registry", max_batch=1) as engine:
        (ours,) = engine.forward_logits([Request(prompt_ids=ids)])
    want = reference_logits(quantized, ids)
    assert (ours - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_a_checkpoint_whose_kernels_are_missing_is_refused_in_one_line(
    tiny_base: Path, tmp_path: Path, method: str
) -> None:
    """A GPTQ, AWQ or compressed-tensors checkpoint whose library is not installed (this CPU machine): refused at
    load in one line naming the checkpoint and what is missing, never loaded as if it were float."""
    base = tmp_path / method
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 32}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidBaseModel, match=f"{base}: cannot be loaded") as e:
        load_model(base)
    assert "\n" not in str(e.value).strip()
