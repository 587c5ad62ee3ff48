"""VeRA, added as one folder and one registration line: its batched op against the row-loop reference, its served
rows (beside LoRA and base rows) equal to PEFT's own VeRA model, training and publishing through PEFT, and broken
artifacts refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotswap.basemodel import fingerprint, load_model
from hotswap.errors import ArtifactRejected, UnsupportedAdapter
from hotswap.methods import RandomKnobs, base_checker, load_adapter, registered
from hotswap.methods.api import BaseInfo, BatchPlan
from hotswap.methods.vera.artifact import random_veras
from hotswap.methods.vera.kind import VeraFactors, VeraKind
from hotswap.methods.vera.ops_ref import vera_linear
from hotswap.registry import PEFT_CONFIG, Registry
from hotswap.serve import Engine, Request
from hotswap.train import TrainConfig, train
from tests.serve.reference import peft_model, reference_greedy, reference_logits

IN, OUT, SLOTS = 24, 20, 6
LAYER = "base_model.model.model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("tokens", [1, 5])
def test_batched_vera_matches_the_row_loop(k: int, tokens: int) -> None:
    """Adapters of different ranks (padded tables), projections wider than the layer (sliced), composed with
    weights, beside rows without adapters, a cleared slot and a slot the kind does not hold."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(IN, OUT)
    kind = VeraKind(base, SLOTS, base.weight.dtype)
    adapters = {}
    for slot in range(1, SLOTS):  # slot SLOTS stays empty: another method's
        r = 2 + slot
        shared_a, shared_b = torch.randn(r, IN + 3, generator=g), torch.randn(OUT + 5, r, generator=g)
        adapters[slot] = (shared_a, shared_b, torch.randn(r, generator=g), torch.randn(OUT, generator=g))
        kind.set(slot, VeraFactors.fold(*adapters[slot], base, torch.float32))
    kind.set(2, None)
    del adapters[2]
    rows = 8
    slots = torch.randint(0, SLOTS + 1, (rows, k), generator=g)
    weights = torch.tensor([1.0, 0.5, -1.0][:k]).repeat(rows, 1)
    plan = BatchPlan()
    plan.set([[(int(s), float(w)) for s, w in zip(sr, wr, strict=True)] for sr, wr in zip(slots, weights, strict=True)],
             torch.device("cpu"))  # fmt: skip
    used = sorted(s for s in plan.used if kind.holds(s))
    assert used
    x = torch.randn(rows, tokens, IN, generator=g)
    with torch.no_grad():
        base_out = base(x)
        fast = kind.apply(x, base_out, base_out, kind.gather(plan, used))
    ref = vera_linear(x, base, adapters, slots, weights)
    assert (fast - ref).abs().max() <= 1e-5 * (ref.abs().max() + 1)


def test_served_vera_equals_peft_beside_lora_and_base_rows(tiny_base: Path, tmp_path: Path) -> None:
    """Two VeRA adapters (ranks 8 and 4) in one batch with a base row and a LoRA row: each row's logits and greedy
    tokens equal its own PEFT model's; the registry detects the method from adapter_config.json."""
    (vera8,) = random_veras(tiny_base, {tmp_path / "vera8": 5}, rank=8, std=0.5)
    (vera4,) = random_veras(tiny_base, {tmp_path / "vera4": 6}, rank=4, std=0.5)
    (lora,) = registered()["lora"].random(tiny_base, {tmp_path / "lora": 3}, RandomKnobs(rank=4))  # type: ignore[misc]
    reg = Registry(tmp_path / "registry")
    check = base_checker(tiny_base)
    for name, path in (("vera8", vera8), ("vera4", vera4), ("lora", lora)):
        reg.publish(path, name, base_fingerprint=fingerprint(tiny_base), check=check)
    assert reg.resolve("vera8").method == reg.resolve("vera4").method == "vera"
    ids = [5, 17, 99, 3, 42, 7]
    models = {"vera8": peft_model(tiny_base, vera8), "vera4": peft_model(tiny_base, vera4)}
    refs = {name: reference_logits(model, ids) for name, model in models.items()}
    refs["lora"] = reference_logits(peft_model(tiny_base, lora), ids)
    refs[None] = reference_logits(load_model(tiny_base), ids)
    assert min((refs[name] - refs[None]).abs().max() for name in models) > 1e-2
    order = ["vera8", None, "lora", "vera4"]
    with Engine(tiny_base, reg, max_batch=4) as engine:
        reqs = [Request(prompt_ids=ids, adapters=[n] if n else [], max_new_tokens=6, ignore_eos=True) for n in order]
        logits = engine.forward_logits(reqs)
        results = engine.generate(reqs)
    for name, ours, result in zip(order, logits, results, strict=True):
        assert (ours - refs[name]).abs().max() <= 1e-4 * refs[name].abs().max(), name
        if name in models:
            assert result.token_ids == reference_greedy(models[name], ids, 6), name


def test_trained_vera_is_published_and_detected(tiny_base: Path, tmp_path: Path) -> None:
    """Training through PEFT's VeraConfig lowers the eval loss; the artifact (projections saved) publishes, and
    published without a method it is detected as vera from its adapter_config.json."""
    options = {"rank": 16, "target_modules": ["q_proj", "v_proj", "down_proj"], "projection_prng_key": 3}
    config = TrainConfig(method="vera", options=options, steps=20, batch_size=8, eval_steps=20)
    result = train(config, tiny_base, "builtin:mapping", tmp_path / "run", push="tuned", registry=tmp_path / "reg",
                   quiet=True)  # fmt: skip
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_untrained"]
    peft_config = json.loads((result.artifact / PEFT_CONFIG).read_text())
    assert peft_config["peft_type"] == "VERA" and peft_config["r"] == 16 and peft_config["projection_prng_key"] == 3
    assert set(peft_config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    reg = Registry(tmp_path / "reg")
    assert reg.resolve("tuned").method == "vera"
    assert reg.publish(result.artifact, "detected", base_fingerprint=fingerprint(tiny_base)).method == "vera"


def _shrink(t: dict[str, torch.Tensor]) -> None:
    t[f"{LAYER}.vera_lambda_b"] = t[f"{LAYER}.vera_lambda_b"][:-1]


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[f"{LAYER}.vera_lambda_d"][0] = float("nan")


def _narrow(t: dict[str, torch.Tensor]) -> None:
    t["base_model.vera_A"] = t["base_model.vera_A"][:, :-1].contiguous()


def _stranger(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.9.self_attn.q_proj.vera_lambda_b"] = t[f"{LAYER}.vera_lambda_b"].clone()


BROKEN: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "wrong shape": (_shrink, f"tensor {LAYER}.vera_lambda_b has shape (63,), this base needs (64,)"),
    "nan": (_nan, f"tensor {LAYER}.vera_lambda_d holds NaN or infinite values"),
    "missing vector": (lambda t: t.pop(f"{LAYER}.vera_lambda_d"), f"lacks tensor '{LAYER}.vera_lambda_d'"),
    "missing projection": (lambda t: t.pop("base_model.vera_B"), "lacks tensor 'base_model.vera_B'"),
    "narrow projection": (_narrow, "tensor base_model.vera_A has shape (4, 127), this base needs (4, >= 128)"),
    "extra tensor": (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensor 'extra'"),
    "foreign target": (_stranger, "targets 'model.layers.9.self_attn.q_proj', not a linear layer"),
}


@pytest.fixture(scope="module")
def good_vera(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_veras(tiny_base, {tmp_path_factory.mktemp("vera") / "good": 1}, rank=4)[0]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_vera_artifacts_are_refused(case: str, good_vera: Path, tiny_base: Path, tmp_path: Path) -> None:
    """Each refusal names the adapter and the tensor; publishing against the base refuses it too."""
    break_it, message = BROKEN[case]
    bad = shutil.copytree(good_vera, tmp_path / "bad")
    tensors = load_file(bad / WEIGHTS)
    break_it(tensors)
    save_file(tensors, bad / WEIGHTS)
    with pytest.raises(ArtifactRejected, match=r"^bad@1: ") as e:
        load_adapter(bad, "bad@1", "vera", BaseInfo.of(load_model(tiny_base)))
    assert message in str(e.value)
    with pytest.raises(ArtifactRejected):
        Registry(tmp_path / "reg").publish(bad, "bad", base_fingerprint=fingerprint(tiny_base),
                                           check=base_checker(tiny_base))  # fmt: skip


def test_vera_without_its_projections_is_refused(good_vera: Path, tiny_base: Path, tmp_path: Path) -> None:
    """PEFT can save VeRA without the shared projections (regenerated from the PRNG key): not served."""
    bad = shutil.copytree(good_vera, tmp_path / "bad")
    config = json.loads((bad / PEFT_CONFIG).read_text())
    (bad / PEFT_CONFIG).write_text(json.dumps({**config, "save_projection": False}))
    with pytest.raises(UnsupportedAdapter, match=r"^bad@1: VeRA without its saved projections"):
        load_adapter(bad, "bad@1", "vera", BaseInfo.of(load_model(tiny_base)))
