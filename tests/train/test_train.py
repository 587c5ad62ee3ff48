"""Training: every method learns a built-in task, its artifact loads back (PEFT) and serves with the
trained model's logits (engine), runs are recorded in the manifest, and bad input publishes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from hotswap.basemodel import build_model, build_with_tokenizer, fingerprint, load_model, save_model
from hotswap.cli import main
from hotswap.errors import InvalidArgument, InvalidBaseModel
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import TrainConfig, TrainResult, train
from hotswap.train.data import builtin
from tests.conftest import SMALL

PEFT_LOADABLE = ("lora", "dora", "adalora", "plora", "prefix", "prompt")  # adalora/plora: exported as LoRA
METHODS = (*PEFT_LOADABLE, "bitfit", "bottleneck", "fishmask", "child-tuning", "proxy")
PROBE = [[5, 12], [5, 30, 11], [7, 8, 9, 10]]  # token-id prompts to compare logits on


@pytest.fixture(scope="module")
def runs(
    trainable_base: Path, trainable_small: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[TrainResult, Path]]:
    """One short run per method on builtin:mapping, each published to its own name."""
    root = tmp_path_factory.mktemp("runs")
    registry = root / "registry"
    out = {}
    for method in METHODS:
        options = {"small_model": str(trainable_small)} if method == "proxy" else {}
        config = TrainConfig(method=method, options=options, steps=150, eval_steps=50, seed=0)
        result = train(config, trainable_base, "builtin:mapping", root / method, push=f"t-{method}",
                       registry=registry, aliases=["staging"], quiet=True)  # fmt: skip
        out[method] = (result, registry)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns(runs: dict, method: str) -> None:
    result, _ = runs[method]
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_untrained"] - 0.5, m
    assert m["eval_accuracy"] > m["eval_accuracy_untrained"] + 0.2, m
    if method in ("lora", "dora", "adalora", "plora"):
        assert m["eval_accuracy"] >= 0.9
    assert m["trainable_pct"] > 0 and m["trainable_params"] > 0
    assert m["steps"] == 150 and m["wall_seconds"] > 0 and m["peak_memory_bytes"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_published_with_lineage_and_curve(runs: dict, method: str, trainable_base: Path) -> None:
    result, registry = runs[method]
    manifest = Registry(registry).resolve(f"t-{method}:staging")
    assert manifest.method == method and manifest.ref == result.manifest.ref == f"t-{method}@1"
    lineage = manifest.lineage
    assert lineage.data_digest == builtin("mapping", 512, 0).digest
    assert lineage.training_config["method"] == method and lineage.training_config["steps"] == 150
    assert lineage.code_version.startswith("hotswap ")
    assert manifest.metrics["eval_loss"] == result.metrics["eval_loss"]
    run = result.artifact.parent
    rows = (run / "loss_curve.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,eval_loss" and len(rows) == 151
    assert rows[50].split(",")[2] and not rows[49].split(",")[2]  # eval every 50 steps
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    return out[-len(ids) :]  # prompt tuning prepends virtual positions


def test_adalora_publishes_its_final_ranks(runs: dict) -> None:
    result, _ = runs["adalora"]
    ranks = json.loads((result.artifact / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(ranks.values()) == result.metrics["adalora_final_rank_total"] <= 14 * 8  # budget: target_rank 8
    assert len(set(ranks.values())) > 1  # reallocated: layers end at different ranks
    assert all(1 <= r <= 12 for r in ranks.values())


@pytest.mark.parametrize("method", PEFT_LOADABLE)
def test_peft_artifact_loads_back(runs: dict, method: str, trainable_base: Path) -> None:
    result, _ = runs[method]
    loaded = PeftModel.from_pretrained(load_model(trainable_base), result.artifact).eval()
    for ids in PROBE:
        torch.testing.assert_close(_logits(loaded, ids), _logits(result.model, ids), rtol=0, atol=1e-5)


def test_engine_serves_trained_adapters_with_trained_logits(runs: dict, trainable_base: Path) -> None:
    registry = next(iter(runs.values()))[1]
    with Engine(trainable_base, registry, max_batch=len(METHODS) * len(PROBE), max_seq_len=64) as engine:
        requests = [Request(prompt_ids=ids, adapters=[f"t-{m}:staging"]) for m in METHODS for ids in PROBE]
        served = engine.forward_logits(requests)  # all methods in ONE batch
    for i, (method, ids) in enumerate((m, ids) for m in METHODS for ids in PROBE):
        expected = _logits(runs[method][0].model, ids)
        torch.testing.assert_close(served[i], expected, rtol=0, atol=1e-4, msg=f"{method} {ids}")


def test_trains_on_jsonl_text(tmp_path: Path) -> None:
    model, tok = build_with_tokenizer("tiny", "minilm", seed=0, initializer_range=0.1)
    base = save_model(model, tmp_path / "base", tok)
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "pink"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the colour {c} is", "completion": c}) + "\n" for c in colours * 4))
    result = train(TrainConfig(method="lora", steps=60, eval_steps=30), base, str(data), tmp_path / "run", quiet=True)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_untrained"] - 1.0
    assert result.manifest is None and (result.artifact / "adapter_config.json").is_file()


BAD_DATA = [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completon": "b"}\n', r"train.jsonl:2: .*unknown keys"),
    ('{"prompt": "a", "completion": "b"}\nnot json\n', r"train.jsonl:2: not valid JSON"),
    ('{"text": 3}\n', r"train.jsonl:1: 'text' must be a string"),
    ("\n\n", r"no records"),
    ("[1, 2]\n", r"train.jsonl:1: expected a JSON object"),
]


@pytest.mark.parametrize(("content", "message"), BAD_DATA)
def test_bad_data_names_the_line(tmp_path: Path, text_base: Path, content: str, message: str) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    registry = tmp_path / "registry"
    with pytest.raises(InvalidArgument, match=message):
        train(TrainConfig(method="lora", steps=1), text_base, str(data), tmp_path / "run", push="x", registry=registry)
    assert not registry.exists() or Registry(registry).names() == []


def test_refusals_publish_nothing(tmp_path: Path, trainable_base: Path) -> None:
    registry = tmp_path / "registry"

    def run(config: TrainConfig, base: Path = trainable_base, data: str = "builtin:mapping") -> None:
        train(config, base, data, tmp_path / "run", push="x", registry=registry, quiet=True)

    with pytest.raises(InvalidArgument, match="unknown method 'lorax'"):
        run(TrainConfig(method="lorax"))
    with pytest.raises(InvalidArgument, match="num_virtual_tokens do not apply to lora"):
        run(TrainConfig(method="lora", options={"num_virtual_tokens": 3}))
    with pytest.raises(InvalidArgument, match="rank must be >= 1"):
        run(TrainConfig(method="lora", options={"rank": 0}))
    with pytest.raises(InvalidArgument, match="query_proj"):
        run(TrainConfig(method="lora", steps=1, options={"target_modules": ("query_proj",)}))
    with pytest.raises(InvalidArgument, match="no linear layer matches"):
        run(TrainConfig(method="bitfit", steps=1, options={"target_modules": ("query_proj",)}))
    with pytest.raises(InvalidArgument, match="unknown built-in task"):
        run(TrainConfig(method="lora", steps=1), data="builtin:nope")
    with pytest.raises(InvalidArgument, match="needs a base with a tokenizer"):
        run(TrainConfig(method="lora", steps=1), data=str(tmp_path / "x.jsonl"))
    with pytest.raises(InvalidBaseModel):
        run(TrainConfig(method="lora", steps=1), base=tmp_path)
    with pytest.raises(InvalidArgument, match="steps or epochs"):
        run(TrainConfig(method="lora", steps=3, epochs=1))
    with pytest.raises(InvalidArgument, match="prefix cannot train with gradient checkpointing"):
        run(TrainConfig(method="prefix", steps=1, gradient_checkpointing=True))
    assert not registry.exists() or Registry(registry).names() == []


def test_cli_train_and_push(tmp_path: Path, trainable_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "registry")
    args = ["--registry", reg, "train", "--method", "bitfit", "--base", str(trainable_base), "--data",
            "builtin:modadd", "--steps", "20", "--out", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    assert main([*args, "--push", "acme/adder", "--alias", "prod"]) == 0
    out = capsys.readouterr().out
    assert "trained bitfit: eval loss" in out and "published acme/adder@1 (aliases: prod)" in out
    manifest = Registry(reg).resolve("acme/adder:prod")
    assert manifest.visibility == "private" and manifest.lineage.training_config["steps"] == 20
    # the same --out again: refused, nothing new published
    assert main([*args, "--push", "acme/adder"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:-3], "--out", str(tmp_path / "r2"), "--rank", "4", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "hotswap: error: option(s) rank do not apply to bitfit (its options: target_modules)"
    )
    assert [m.version for m in Registry(reg).versions("acme/adder")] == [1]


@pytest.mark.parametrize("method", ["lora", "dylora", "plora", "prompt", "bottleneck", "child-tuning", "proxy"])
def test_gradient_checkpointing_trains_the_same(
    method: str, trainable_base: Path, trainable_small: Path, tmp_path: Path
) -> None:
    """Checkpointed layers recompute their activations in backward: same losses, same artifact."""
    options = {"small_model": str(trainable_small)} if method == "proxy" else {}
    results = {}
    for ckpt in (False, True):
        config = TrainConfig(method=method, options=options, steps=4, eval_steps=4, gradient_checkpointing=ckpt)
        results[ckpt] = train(config, trainable_base, "builtin:mapping", tmp_path / str(ckpt), quiet=True)
    layers = [m for m in results[True].model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and not any(getattr(m, "gradient_checkpointing", False) for m in results[False].model.modules())
    plain, ckpt = results[False], results[True]
    assert [p[1] for p in ckpt.curve] == pytest.approx([p[1] for p in plain.curve], rel=1e-4)
    for path in sorted(plain.artifact.rglob("*.safetensors")):
        want, got = load_file(path), load_file(ckpt.artifact / path.relative_to(plain.artifact))
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_cli_gradient_checkpointing(tmp_path: Path, trainable_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--base", str(trainable_base), "--data", "builtin:mapping", "--steps", "2", "--quiet",
            "--gradient-checkpointing"]  # fmt: skip
    assert main([*args, "--method", "bitfit", "--out", str(tmp_path / "a")]) == 0
    assert "trained bitfit" in capsys.readouterr().out
    assert main([*args, "--method", "prefix", "--out", str(tmp_path / "b")]) == 2
    assert "prefix cannot train with gradient checkpointing" in capsys.readouterr().err
    assert not (tmp_path / "b" / "adapter").exists()


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_fine_tune_further_from_a_parent(runs: dict, method: str, trainable_base: Path, tmp_path: Path) -> None:
    first, registry = runs[method]
    config = TrainConfig(method=method, steps=30, eval_steps=30, seed=1)
    child = train(config, trainable_base, "builtin:mapping", tmp_path / "child", push=f"t-{method}",
                  registry=registry, parent=f"t-{method}:staging", quiet=True)  # fmt: skip
    assert child.manifest is not None and child.manifest.lineage.parent == f"t-{method}@1"
    assert child.manifest.version == 2
    # it starts where the parent ended (same eval set: a fresh draw with seed + 10000 differs by seed)
    start = child.metrics["eval_loss_untrained"]
    assert start < first.metrics["eval_loss_untrained"] - 0.5
    assert child.metrics["eval_loss"] <= start + 0.05


def test_parent_refusals(runs: dict, trainable_base: Path, tmp_path: Path) -> None:
    _, registry = runs["lora"]

    def run(method: str, parent: str, **options: object) -> None:
        config = TrainConfig(method=method, steps=1, options=options)
        train(config, trainable_base, "builtin:mapping", tmp_path / "run", push="x", registry=registry,
              parent=parent, quiet=True)  # fmt: skip

    with pytest.raises(InvalidArgument, match="cannot continue from a parent"):
        run("dylora", "t-dylora")
    with pytest.raises(InvalidArgument, match="is dora, not lora"):
        run("lora", "t-dora")
    with pytest.raises(InvalidArgument, match="drop the method options"):
        run("lora", "t-lora", rank=4)
    assert "x" not in Registry(registry).names()


@pytest.mark.parametrize("method", ["fishmask", "child-tuning"])
def test_sparse_methods_touch_only_masked_weights(runs: dict, method: str, trainable_base: Path) -> None:
    result, _ = runs[method]
    base = dict(load_model(trainable_base).named_parameters())
    trained = dict(result.model.named_parameters())
    tensors = load_file(result.artifact / "adapter_model.safetensors")
    changed_total = 0
    for name, before in base.items():
        after = trained[name].detach()
        module = name.removesuffix(".weight")
        key = f"{module}.weight.indices"
        changed = (after != before).flatten().nonzero().flatten()
        if key not in tensors:
            assert changed.numel() == 0, name  # not a target: bit-exact
            continue
        allowed = set(tensors[key].tolist())
        assert set(changed.tolist()) <= allowed, name  # only masked entries moved
        changed_total += changed.numel()
    total = sum(t.numel() for k, t in tensors.items() if k.endswith(".indices"))
    density = {"fishmask": 0.005, "child-tuning": 0.2}[method]
    assert total == result.metrics["trainable_params"]
    assert abs(result.metrics["sparse_density"] - density) < 1e-3 and changed_total > 0


def test_child_tuning_task_free_variant(trainable_base: Path, tmp_path: Path) -> None:
    """Bernoulli(p) gradient masks per step: after t steps about 1 - (1 - p)^t of the weights moved."""
    config = TrainConfig(method="child-tuning", options={"variant": "f", "density": 0.3}, steps=40, eval_steps=40)
    m = train(config, trainable_base, "builtin:mapping", tmp_path / "run", quiet=True).metrics
    assert m["eval_loss"] < m["eval_loss_untrained"] - 0.5
    short = TrainConfig(method="child-tuning", options={"variant": "f", "density": 0.3}, steps=2, eval_steps=2)
    m2 = train(short, trainable_base, "builtin:mapping", tmp_path / "short", quiet=True).metrics
    assert abs(m2["sparse_density"] - (1 - 0.7**2)) < 0.02 and m["sparse_density"] > 0.99


def test_proxy_trains_only_the_expert(runs: dict, trainable_base: Path, trainable_small: Path) -> None:
    """The artifact holds the tuned expert and the untouched small model; the base is not part of it."""
    result, registry = runs["proxy"]
    config = json.loads((result.artifact / "hotswap_config.json").read_text())
    assert config["method"] == "proxy" and config["alpha"] == 1.0
    assert config["anti_expert_fingerprint"] == fingerprint(trainable_small)
    anti = load_model(result.artifact / "anti_expert")
    expert = load_model(result.artifact / "expert")
    small = dict(load_model(trainable_small).named_parameters())
    assert all(torch.equal(p, small[n]) for n, p in anti.named_parameters())
    assert any(not torch.equal(p, small[n]) for n, p in expert.named_parameters())
    base = dict(load_model(trainable_base).named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in result.model.base.named_parameters())
    assert result.metrics["trainable_params"] == sum(p.numel() for p in expert.parameters())
    manifest = Registry(registry).resolve("t-proxy@1")
    assert {"expert/model.safetensors", "anti_expert/model.safetensors", "hotswap_config.json"} <= set(manifest.files)


def test_proxy_refusals(tmp_path: Path, trainable_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(**options: object) -> None:
        train(TrainConfig(method="proxy", options=options, steps=1), trainable_base, "builtin:mapping",
              tmp_path / "run", quiet=True)  # fmt: skip

    with pytest.raises(InvalidArgument, match="proxy needs small_model"):
        run()
    with pytest.raises(InvalidArgument, match=r"small_model: .*not a model checkpoint"):
        run(small_model=str(tmp_path))
    foreign = save_model(build_model("tiny", seed=1, vocab_size=100, **SMALL), tmp_path / "foreign")
    with pytest.raises(InvalidArgument, match="vocabulary size 100, the base 256"):
        run(small_model=str(foreign))
    args = ["train", "--method", "proxy", "--base", str(trainable_base), "--data", "builtin:mapping", "--quiet",
            "--out", str(tmp_path / "cli"), "--small-model", str(foreign)]  # fmt: skip
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (in-process: transformers' load bar came first)
    assert last.startswith("hotswap: error: small_model has vocabulary size 100")
    assert not (tmp_path / "cli" / "adapter").exists()


def test_cli_train_flags_come_from_the_methods_options(capsys: pytest.CaptureFixture[str]) -> None:
    """Every option field of every registered trainable method is a `hotswap train` flag, with its help; a method
    added as a folder (IA3) gets its flags without touching the CLI."""
    import dataclasses

    from hotswap.train import trainable_methods

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for spec in trainable_methods().values():
        assert spec.name in help_text and spec.summary in help_text
        for f in dataclasses.fields(spec.options):
            assert f"--{f.metadata.get('flag', f.name).replace('_', '-')}" in help_text, f.name
            assert " ".join(f.metadata["help"].split()) in help_text, f.name


def test_cli_trains_ia3_with_its_own_flags(
    tmp_path: Path, trainable_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--method", "ia3", "--base", str(trainable_base), "--data", "builtin:mapping", "--steps",
                 "3", "--targets", "v_proj,down_proj", "--feedforward-modules", "down_proj", "--out",
                 str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert code == 0 and "trained ia3" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "v_proj"] and config["feedforward_modules"] == [
        "down_proj"
    ]
