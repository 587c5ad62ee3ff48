"""Methods checked against closed forms and references: BitFit, weighted composition, sparse deltas,
bottleneck modules, proxy-tuning; unsupported artifacts refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from hotswap.basemodel import build_model, fingerprint, load_model
from hotswap.errors import ArtifactRejected, UnsupportedAdapter
from hotswap.methods.proxy.artifact import write_proxy
from hotswap.methods.proxy.ops_ref import ProxyTuned
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from tests.conftest import SMALL
from tests.serve.reference import peft_model, reference_greedy, reference_logits

IDS = [11, 42, 7, 99, 3, 250, 18]


def _lora_delta(adapter: Path, module: str, weight: float) -> torch.Tensor:
    """weight * (alpha / r) * B @ A for one module of a PEFT LoRA artifact."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    return weight * config["lora_alpha"] / config["r"] * (b @ a)


def test_bitfit_matches_a_base_with_those_biases(engine: Engine, adapters: dict[str, Path], tiny_base: Path) -> None:
    model = load_model(tiny_base)
    for key, delta in load_file(adapters["bitfit"] / "adapter_model.safetensors").items():
        layer = model.get_submodule(key.removesuffix(".bias"))
        assert layer.bias is None  # Llama has no biases: the adapter's rows get one, others do not
        layer.bias = torch.nn.Parameter(delta.clone())
    ref = reference_logits(model, IDS)
    ours, base_row = engine.forward_logits(
        [Request(prompt_ids=IDS, adapters=["bitfit"]), Request(prompt_ids=IDS, adapters=[])]
    )
    assert (ref - reference_logits(load_model(tiny_base), IDS)).abs().max() > 1e-2
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (base_row - reference_logits(load_model(tiny_base), IDS)).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("weights", [(1.0, 0.5), (0.3, -1.0)])
def test_weighted_composition_equals_the_closed_form(
    engine: Engine, adapters: dict[str, Path], tiny_base: Path, weights: tuple[float, float]
) -> None:
    wa, wb = weights
    merged = copy.deepcopy(load_model(tiny_base))
    with torch.no_grad():
        for name, module in merged.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight += _lora_delta(adapters["lora4"], name, wa)
                if name.endswith(("q_proj", "v_proj")):
                    module.weight += _lora_delta(adapters["lora8qv"], name, wb)
    ref = reference_logits(merged, IDS)
    (ours,) = engine.forward_logits([Request(prompt_ids=IDS, adapters=[("lora4", wa), ("lora8qv", wb)])])
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_zero_weight_partner_changes_nothing(engine: Engine) -> None:
    """Mixing methods in one request (BitFit + DoRA): a partner at weight 0 leaves the row as it was."""
    rows = engine.forward_logits(
        [
            Request(prompt_ids=IDS, adapters=[]),
            Request(prompt_ids=IDS, adapters=["bitfit"]),
            Request(prompt_ids=IDS, adapters=[("bitfit", 1.0), ("dora", 0.0)]),
        ]
    )
    assert torch.allclose(rows[1], rows[2], atol=1e-5)  # a zero-weight partner changes nothing
    assert (rows[1] - rows[0]).abs().max() > 1e-2


def test_unsupported_method_fails_the_request_and_engine_keeps_serving(tiny_base: Path, tmp_path: Path) -> None:
    art = tmp_path / "weird"
    art.mkdir()
    save_file({"x": np.ones(3, np.float32)}, str(art / "adapter_model.safetensors"))
    (art / "hotswap_config.json").write_text(json.dumps({"method": "nonesuch"}))
    reg = Registry(tmp_path / "reg")
    reg.publish(art, "weird", base_fingerprint=fingerprint(tiny_base))
    with Engine(tiny_base, reg, max_batch=4, max_resident=2) as eng:
        with pytest.raises(UnsupportedAdapter, match="nonesuch"):
            eng.generate([Request(prompt_ids=IDS, adapters=["weird"], max_new_tokens=2)])
        assert len(eng.generate([Request(prompt_ids=IDS, max_new_tokens=2)])[0].token_ids) == 2


@pytest.mark.parametrize("name", ["fishmask", "child"])
def test_sparse_delta_matches_a_base_with_those_weights(
    engine: Engine, adapters: dict[str, Path], tiny_base: Path, name: str
) -> None:
    """Child-tuning / FishMask rows equal a model whose W had the delta added (the engine never does)."""
    model = load_model(tiny_base)
    tensors = load_file(adapters[name] / "adapter_model.safetensors")
    touched = 0
    for key in [k for k in tensors if k.endswith(".weight.indices")]:
        module = key.removesuffix(".weight.indices")
        weight = model.get_submodule(module).weight
        with torch.no_grad():
            weight.view(-1)[tensors[key]] += tensors[f"{module}.weight.values"]
        touched += 1
    assert touched == 14  # every linear of both blocks
    ref = reference_logits(model, IDS)
    ours, base_row = engine.forward_logits(
        [Request(prompt_ids=IDS, adapters=[name]), Request(prompt_ids=IDS, adapters=[])]
    )
    assert (ref - reference_logits(load_model(tiny_base), IDS)).abs().max() > 1e-2
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (base_row - reference_logits(load_model(tiny_base), IDS)).abs().max() <= 1e-5 * ref.abs().max()


def test_every_method_in_one_batch_equals_each_alone(engine: Engine, adapters: dict[str, Path]) -> None:
    names = sorted(adapters)
    together = engine.forward_logits([Request(prompt_ids=IDS, adapters=[n]) for n in names])
    for name, got in zip(names, together, strict=True):
        (alone,) = engine.forward_logits([Request(prompt_ids=IDS, adapters=[name])])
        assert (got - alone).abs().max() <= 1e-5 * alone.abs().max(), name


@pytest.mark.parametrize("name", ["bottleneck", "bottleneck-par"])
def test_bottleneck_matches_a_model_with_the_modules(
    engine: Engine, adapters: dict[str, Path], tiny_base: Path, name: str
) -> None:
    """Rows with a bottleneck adapter equal a model whose o_proj/down_proj carry the trained modules."""
    from hotswap.methods.bottleneck.train import BottleneckOptions, attach_bottleneck

    config = json.loads((adapters[name] / "hotswap_config.json").read_text())
    model = load_model(tiny_base)
    opts = BottleneckOptions(config["bottleneck_dim"], config["activation"], config["placement"])
    modules = attach_bottleneck(model, opts).modules
    tensors = load_file(adapters[name] / "adapter_model.safetensors")
    with torch.no_grad():
        for module, wrapped in modules.items():
            for part, layer in (("down", wrapped.down), ("up", wrapped.up)):
                layer.weight.copy_(tensors[f"{module}.adapter_{part}.weight"])
                layer.bias.copy_(tensors[f"{module}.adapter_{part}.bias"])
    ref = reference_logits(model, IDS)
    (ours,) = engine.forward_logits([Request(prompt_ids=IDS, adapters=[name])])
    assert (ref - reference_logits(load_model(tiny_base), IDS)).abs().max() > 1e-2
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def _proxy_reference(adapter: Path, base: torch.nn.Module, weight: float = 1.0) -> ProxyTuned:
    """The proxy-tuned ensemble of an artifact's two small models over ``base``, by plain full forwards."""
    alpha = json.loads((adapter / "hotswap_config.json").read_text())["alpha"]
    return ProxyTuned(base, load_model(adapter / "expert"), load_model(adapter / "anti_expert"), weight * alpha)


def test_proxy_rows_match_the_reference(engine: Engine, adapters: dict[str, Path], tiny_base: Path) -> None:
    """A proxy row = base + alpha (expert - anti-expert); weighted and beside LoRA / prompt tuning in one row."""
    proxy = adapters["proxy"]
    cases = [
        (["proxy"], _proxy_reference(proxy, load_model(tiny_base))),
        ([("proxy", 0.5), "lora4"], _proxy_reference(proxy, peft_model(tiny_base, adapters["lora4"]), 0.5)),
        (["prompt", "proxy"], _proxy_reference(proxy, peft_model(tiny_base, adapters["prompt"]))),
        (  # two proxy adapters tuned from one small model: their shared anti-expert runs once
            [("proxy", 0.5), "proxy2"],
            _proxy_reference(adapters["proxy2"], _proxy_reference(proxy, load_model(tiny_base), 0.5)),
        ),
    ]
    served = engine.forward_logits([Request(prompt_ids=IDS, adapters=a) for a, _ in [*cases, ([], None)]])
    base = reference_logits(load_model(tiny_base), IDS)
    assert (served[-1] - base).abs().max() <= 1e-5 * base.abs().max()  # a base row beside them is untouched
    for (names, ref_model), got in zip(cases, served, strict=False):
        ref = reference_logits(ref_model, IDS)
        assert (ref - base).abs().max() > 1e-1, names
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), names
    assert engine.kinds.kinds["proxy"].model_counts() == (2, 1)


def test_proxy_decoding_matches_the_reference(engine: Engine, adapters: dict[str, Path], tiny_base: Path) -> None:
    """Greedy tokens of proxy rows (their small models' caches per row) in a batch with other methods."""
    n = 8
    mixed = [["proxy"], ["prefix"], ["prompt", "proxy"], ["lora4"], [("proxy", 0.5), "lora4"]]
    results = engine.generate(
        [Request(prompt_ids=IDS[: 3 + i], adapters=a, max_new_tokens=n, ignore_eos=True) for i, a in enumerate(mixed)]
    )
    proxy = adapters["proxy"]
    expected = {
        0: _proxy_reference(proxy, load_model(tiny_base)),
        2: _proxy_reference(proxy, peft_model(tiny_base, adapters["prompt"])),
        4: _proxy_reference(proxy, peft_model(tiny_base, adapters["lora4"]), 0.5),
    }
    for i, model in expected.items():
        assert results[i].token_ids == reference_greedy(model, IDS[: 3 + i], n), mixed[i]


def test_proxy_with_a_foreign_vocabulary_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    small = build_model("tiny", seed=5, vocab_size=128, **SMALL)
    out = tmp_path / "proxy"
    out.mkdir()
    write_proxy(out, small, small, 1.0)
    reg = Registry(tmp_path / "registry")
    reg.publish(out, "foreign", base_fingerprint=fingerprint(tiny_base))
    with Engine(tiny_base, reg, max_batch=2, max_resident=2) as eng:
        with pytest.raises(ArtifactRejected, match="vocabulary size 128, the base 256"):
            eng.generate([Request(prompt_ids=IDS, adapters=["foreign"], max_new_tokens=2)])
        assert eng.generate([Request(prompt_ids=IDS, max_new_tokens=2)])[0].token_ids  # still serving
