"""LoRA beyond the blocks' linears, served unmerged per row beside plain LoRA and base rows: LoRA on the input
embedding (PEFT's ``lora_embedding_A/B``) and on the output head, and PEFT's trainable tokens (new rows for some
tokens; on a tied head its logits' rows too). Each row equals PEFT's single-adapter model (a weighted pair of them:
PEFT with both adapters active, the second's deltas scaled), on an untied base, a tied one (Qwen2) and one whose
embedding scales its rows (Gemma 2); the static decode gives the same tokens, traced whole. ``modules_to_save``
copies, tokens past the base's vocabulary and a saved embedding that is not the base's are refused in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from hotswap.basemodel import build_model, fingerprint, load_model, save_model
from hotswap.errors import ArtifactRejected, UnsupportedAdapter
from hotswap.methods import base_checker
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from tests.serve.reference import TEST_DEVICE, peft_model, reference_greedy, reference_logits

TOKENS = [5, 6, 7, 21, 30]  # the trainable tokens: some prompts use them, and greedy decoding can emit them
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30], [40, 41, 42, 43], [6, 7, 30, 2], [7, 21, 9, 5]]
ROWS: list[list] = [["emb"], ["tok"], [], ["lora"], ["tok"], [("lora", 1.0), ("tok", 0.5)]]
NEW = 6
WEIGHTS = "adapter_model.safetensors"


def _peft_artifact(base: Path, out: Path, seed: int, **config: object) -> Path:
    """PEFT's own artifact for ``config``, its trainable tensors moved off their init (random, std 0.2)."""
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(out)
    return out


def _scaled(adapter: Path, base: Path, out: Path, weight: float) -> Path:
    """The same adapter with every delta scaled by ``weight`` (the reference of a row using it at that weight)."""
    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    embed = load_model(base).get_input_embeddings().weight.detach()
    tensors = load_file(adapter / WEIGHTS)
    for key, t in tensors.items():
        if key.endswith("trainable_tokens_delta"):
            tensors[key] = embed[TOKENS] + weight * (t - embed[TOKENS])
        elif "lora_B" in key or "lora_embedding_B" in key:
            tensors[key] = t * weight
    save_file(tensors, out / WEIGHTS)
    return out


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen2", "tiny-gemma2"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    d = tmp_path_factory.mktemp(request.param)
    base = save_model(build_model(request.param, seed=0, initializer_range=0.1), d / "base")
    adapters = {
        "emb": _peft_artifact(base, d / "emb", 1, target_modules=["q_proj", "embed_tokens", "lm_head"]),
        "tok": _peft_artifact(base, d / "tok", 2, target_modules=["v_proj"], trainable_token_indices=TOKENS),
        "lora": _peft_artifact(base, d / "lora", 3, target_modules=["q_proj", "o_proj"]),
    }
    registry = Registry(d / "registry")
    for name, path in adapters.items():
        registry.publish(path, name, base_fingerprint=fingerprint(base))
    requests = [
        Request(prompt_ids=p, adapters=a, max_new_tokens=NEW, ignore_eos=True)
        for p, a in zip(PROMPTS, ROWS, strict=True)
    ]
    runs = {}
    for decode in ("eager", "static"):
        with Engine(
            base, registry, max_batch=8, max_resident=4, max_seq_len=64, decode=decode, device=TEST_DEVICE
        ) as e:
            if decode == "static":  # traced whole by dynamo: the embedding and head deltas add no host sync
                torch._dynamo.reset()
                e.runner.static._forward = torch.compile(e.runner.static._step, backend="eager", fullgraph=True)
            runs[decode] = ([x.cpu() for x in e.forward_logits(requests)], [r.token_ids for r in e.generate(requests)])
            if decode == "static":
                assert e.runner.static.eager_steps == 0
    half = _scaled(adapters["tok"], base, d / "tok-half", 0.5)
    yield {"base": base, "adapters": adapters, "half": half, "runs": runs}


def _reference(run: dict, row: list) -> torch.nn.Module:
    base, adapters = run["base"], run["adapters"]
    if not row:
        return load_model(base)
    if len(row) == 1:
        return peft_model(base, adapters[row[0]])
    model = PeftModel.from_pretrained(load_model(base), adapters["lora"], adapter_name="lora")
    model.load_adapter(run["half"], adapter_name="tok")
    model.base_model.set_adapter(["lora", "tok"])
    return model.eval()


@pytest.mark.parametrize("row", range(len(ROWS)), ids=["emb", "tok", "base", "lora", "tok2", "lora+tok/2"])
def test_row_equals_peft(family: dict, row: int) -> None:
    model, ids = _reference(family, ROWS[row]), PROMPTS[row]
    ref = reference_logits(model, ids)
    if ROWS[row]:
        assert (ref - reference_logits(load_model(family["base"]), ids)).abs().max() > 1e-2
    logits, tokens = family["runs"]["eager"]
    assert (logits[row] - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert tokens[row] == reference_greedy(model, ids, NEW)
    assert family["runs"]["static"][1][row] == tokens[row]


def _tampered(src: Path, out: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    out.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    save_file({**load_file(src / WEIGHTS), **(tensors or {})}, out / WEIGHTS)
    return out


def test_what_is_not_served_is_refused_in_one_line(family: dict, tmp_path: Path) -> None:
    base, adapters = family["base"], family["adapters"]
    check = base_checker(base)
    saved = _peft_artifact(base, tmp_path / "saved", 4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    cases = [
        (saved, UnsupportedAdapter, "modules_to_save \\(lm_head\\) is not served: a whole copy per adapter"),
        (
            _tampered(adapters["tok"], tmp_path / "past", config={"trainable_token_indices": [5, 6, 7, 21, 300]}),
            ArtifactRejected,
            "trainable token 300 is outside the base's vocabulary of 256",
        ),
        (
            _tampered(
                adapters["emb"],
                tmp_path / "other",
                tensors={"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(256, 64)},
            ),
            ArtifactRejected,
            "embed_tokens.base_layer.weight is not the base's model.embed_tokens weight",
        ),
        (
            _tampered(
                adapters["emb"],
                tmp_path / "shape",
                tensors={"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 255)},
            ),
            ArtifactRejected,
            "lora_embedding_A has shape \\(4, 255\\), this base needs \\(4, 256\\)",
        ),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message) as e:
            check(path, "lora")
        assert "\n" not in str(e.value)
