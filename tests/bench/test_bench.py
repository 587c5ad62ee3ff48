"""The benchmark harness at a tiny workload: output format and same-run ratios (no speed assertions)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hotswap.bench import run
from hotswap.bench.common import Workload
from hotswap.cli import main
from hotswap.errors import InvalidArgument
from hotswap.methods import registered

TINY = Workload(model="tiny", batch=4, prompt=8, new_tokens=3, repeats=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert set(data) == {"scenario", "env", "workload", "rows"}
    assert {"torch", "threads", "cpu", "device"} <= set(data["env"])
    assert data["workload"]["model"] == "tiny" and data["workload"]["batch"] == 4
    return data


def _spread(row: dict, ratio: str) -> None:
    """A ratio comes with the min and max of its per-round values around its median."""
    assert row[f"{ratio}_min"] <= row[ratio] <= row[f"{ratio}_max"]


def test_mixed(tmp_path: Path, cache: Path) -> None:
    path, table = run("mixed", TINY, tmp_path, cache, [1, 2])
    data = _load(path)
    base, *rows = data["rows"]
    assert base["label"] == "base (no adapters)"
    # one round: the per-round ratio is the ratio of the figures
    assert base["vs_hf_generate"] == pytest.approx(base["tok_s"] / base["hf_generate_tok_s"])
    assert [r["n_adapters"] for r in rows] == [1, 2]
    for r in rows:
        assert r["vs_base"] == pytest.approx(r["tok_s"] / r["base_tok_s"])
        assert r["vs_peft"] == pytest.approx(r["tok_s"] / r["peft_tok_s"])
        _spread(r, "vs_base")
        _spread(r, "vs_peft")
        assert r["max_abs_logit_diff"] < 1e-4
        assert 0 < r["roofline"] < 1 and r["vs_roofline"] == pytest.approx(r["vs_base"] / r["roofline"])
    assert rows[1]["roofline"] < rows[0]["roofline"]  # two distinct adapters read twice the bytes of one
    assert table.count("\n") == 1 + len(data["rows"]) and "| 2 adapters |" in table
    assert "vs_base_min" not in table  # the spread shares the ratio's cell
    assert f"{rows[0]['vs_base']:.2f} ({rows[0]['vs_base_min']:.2f}–{rows[0]['vs_base_max']:.2f})" in table


def test_continuous(tmp_path: Path, cache: Path) -> None:
    """Twice a batch of requests of staggered lengths: they end at different steps, so the batch changes more often
    than once per wave; each row is against the base in the same run."""
    data = _load(run("continuous", TINY, tmp_path, cache, [1, 2])[0])
    rows = data["rows"]
    assert [r["n_adapters"] for r in rows] == [1, 2] and all(r["requests"] == 8 for r in rows)
    for r in rows:
        assert r["vs_base"] == pytest.approx(r["tok_s"] / r["base_tok_s"])
        _spread(r, "vs_base")
        assert r["batch_changes"] > 2  # at equal lengths, one: the two waves' rows are alike


def test_mixed_on_a_quantized_base(tmp_path: Path, cache: Path) -> None:
    """NF4: adapters published for the NF4 base, PEFT on the same NF4 base, and the float base's row beside it."""
    pytest.importorskip("bitsandbytes")
    base, row = _load(run("mixed", replace(TINY, quantize="nf4"), tmp_path, cache, [1])[0])["rows"]
    assert base["quantize"] == "nf4" and base["base_memory_mb"] < base["float_base_memory_mb"]
    assert base["vs_float_base"] == pytest.approx(base["tok_s"] / base["float_base_tok_s"])
    _spread(base, "vs_float_base")
    assert row["max_abs_logit_diff"] < 1e-4


def test_ratios_are_per_round_medians(tmp_path: Path, cache: Path) -> None:
    """Three interleaved rounds: each ratio is the median of its per-round values, within their min and max."""
    base, row = _load(run("mixed", replace(TINY, repeats=3), tmp_path, cache, [1])[0])["rows"]
    for r, ratios in ((row, ("vs_base", "vs_peft")), (base, ("vs_hf_generate",))):
        for ratio in ratios:
            _spread(r, ratio)


def test_swap_and_load(tmp_path: Path, cache: Path) -> None:
    (row,) = _load(run("swap", TINY, tmp_path, cache, [2])[0])["rows"]
    assert row["vs_peft"] == pytest.approx(row["tok_s"] / row["peft_tok_s"]) and row["max_abs_logit_diff"] < 1e-4
    (row,) = _load(run("load", TINY, tmp_path, cache, [3])[0])["rows"]
    assert 0 < row["load_ms_p50"] <= row["load_ms_p95"]
    _spread(row, "vs_peft")  # per cold load: PEFT's ms ÷ ours, loads alternating
    for stage in ("registry", "install", "verify", "read", "check_cast_pack"):
        assert row[f"{stage}_ms_p50"] > 0, stage


@pytest.mark.slow
def test_methods(tmp_path: Path, cache: Path) -> None:
    """Every method's row on the dense base, then the MoE rows on the MoE base: LoRA on attention and every expert
    (PEFT target_parameters), and on attention alone, each vs that base in the same rounds."""
    data = _load(run("methods", replace(TINY, moe="tiny-olmoe"), tmp_path, cache, [2])[0])
    assert data["workload"]["moe"] == "tiny-olmoe"
    *rows, experts, attention = data["rows"]
    served = [name for name, spec in registered().items() if spec.random is not None]  # every method's folder
    assert {
        "lora",
        "dora",
        "bitfit",
        "prefix",
        "prompt",
        "bottleneck",
        "fishmask",
        "child-tuning",
        "proxy",
        "ia3",
    } <= set(served)
    assert [r["method"] for r in rows] == [*served, "all methods"]
    assert [(r["method"], r["model"], r["targets"]) for r in (experts, attention)] == [
        ("lora", "tiny-olmoe", "attention + experts"),
        ("lora", "tiny-olmoe", "attention"),
    ]
    for r in (*rows, experts, attention):
        assert r["vs_base"] == pytest.approx(r["tok_s"] / r["base_tok_s"])
        _spread(r, "vs_base")
        assert 0 < r["roofline"] <= 1
        if r["max_abs_logit_diff"] is not None:
            assert r["max_abs_logit_diff"] < 1e-4
    for r in (experts, attention):
        assert r["n_adapters"] == 2 and r["max_abs_logit_diff"] is not None  # PEFT's target_parameters LoRA
        assert r["vs_roofline"] == pytest.approx(r["vs_base"] / r["roofline"])
        assert r["base_vs_hf_generate"] == pytest.approx(r["base_tok_s"] / r["hf_generate_tok_s"])
        _spread(r, "base_vs_hf_generate")
    assert experts["base_tok_s"] == attention["base_tok_s"]  # one MoE base, measured in the same rounds
    assert experts["roofline"] < attention["roofline"]  # the experts' factors are read too
    assert experts["base_tok_s"] != rows[0]["base_tok_s"]  # not the dense base


def test_methods_compares_the_methods_asked_for(tmp_path: Path, cache: Path) -> None:
    """``--methods``: those methods' rows and the batch mixing them, nothing else; an unknown one is refused."""
    code = main(["bench", "methods", "--model", "tiny", "--batch", "4", "--prompt", "8", "--new-tokens", "3",
                 "--repeats", "1", "--adapters", "2", "--moe", "none", "--methods", "bitfit,lora",
                 "--out", str(tmp_path), "--cache", str(cache)])  # fmt: skip
    assert code == 0
    rows = _load(tmp_path / "methods.json")["rows"]
    assert [r["method"] for r in rows] == ["bitfit", "lora", "all methods"]
    assert rows[1]["max_abs_logit_diff"] < 1e-4
    with pytest.raises(InvalidArgument, match=r"unknown method 'loar' to benchmark: one of lora, .*"):
        Workload(methods=("lora", "loar"))


def test_methods_moe_base_is_an_moe() -> None:
    """The MoE rows' base: an MoE preset; none leaves the rows out."""
    assert Workload(moe="none").moe == "none" and Workload().moe == "olmoe-mini"
    for wrong in ("tiny", "nope"):
        message = rf"unknown MoE base '{wrong}': one of tiny-mixtral, .*, olmoe-mini, or none"
        with pytest.raises(InvalidArgument, match=message):
            Workload(moe=wrong)


@pytest.mark.slow
def test_decode_modes(tmp_path: Path, cache: Path) -> None:
    """eager, static and compile side by side (cuda-graphs only on CUDA), the same tokens from each."""
    rows = _load(run("decode", TINY, tmp_path, cache, [2])[0])["rows"]
    assert [r["label"] for r in rows] == ["2 adapters"]
    for r in rows:
        assert r["same_tokens"] is True
        for mode in ("static", "compile"):
            assert r[f"vs_{mode}"] == pytest.approx(r[f"{mode}_tok_s"] / r["eager_tok_s"])
        assert "cuda_graphs_tok_s" not in r


def test_cli_prints_table_and_writes_json(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bench",
        "load",
        "--model",
        "tiny",
        "--batch",
        "2",
        "--prompt",
        "4",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--adapters",
        "2",
        "--out",
        str(tmp_path),
        "--cache",
        str(cache),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("| label |") and (tmp_path / "load.json").is_file()


@pytest.mark.slow
def test_server(tmp_path: Path, cache: Path) -> None:
    """`hotswap serve` in a subprocess, one streaming gRPC client per row."""
    main_row, *per_adapter = _load(run("server", TINY, tmp_path, cache, [2])[0])["rows"]
    assert main_row["vs_engine"] == pytest.approx(main_row["tok_s"] / main_row["engine_tok_s"])
    assert 0 < main_row["ttft_ms_p50"] <= main_row["ttft_ms_p95"]
    assert 0 < main_row["itl_ms_p50"] <= main_row["itl_ms_p95"]
    assert [r["label"] for r in per_adapter] == ["adapter lora-0", "adapter lora-1"]


@pytest.mark.slow
def test_train(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each method in its own processes (time, and memory under a fixed mmap threshold): the hand-written loop
    without and with gradient checkpointing, ratios against full fine-tuning from the same run and mode
    (prefix-tuning cannot be checkpointed), and hotswap train's Trainer path in fp32 and bf16, ratios against the
    loop (full fine-tuning runs the loop only). Two methods here, the baseline and the one that cannot be
    checkpointed: each costs up to eight worker processes (the other methods' rows are the same code path)."""
    from hotswap.bench import training

    monkeypatch.setattr(training, "methods", lambda: ("full", "prefix"))
    rows = _load(run("train", TINY, tmp_path, cache, [0])[0])["rows"]
    assert [r["method"] for r in rows] == ["full", "prefix"]
    full = rows[0]
    assert full["trainer_step_s"] is None and full["bf16_vs_fp32_step"] is None
    for r in rows:
        assert r["peak_memory_mb"] > 0 and r["step_s"] > 0
        assert r["vs_full_memory"] == pytest.approx(r["peak_memory_mb"] / full["peak_memory_mb"])
        assert 0 < r["trainable_params"] <= full["trainable_params"]
        if r["method"] != "full":
            assert r["trainer_step_s"] > 0 and r["trainer_peak_memory_mb"] > 0 and r["bf16_step_s"] > 0
            assert r["trainer_vs_loop_step"] == pytest.approx(r["trainer_step_s"] / r["step_s"])
            assert r["bf16_vs_fp32_memory"] == pytest.approx(r["bf16_peak_memory_mb"] / r["trainer_peak_memory_mb"])
        if r["method"] == "prefix":
            assert r["ckpt_peak_memory_mb"] is None and r["ckpt_vs_full_memory"] is None
        else:
            assert r["ckpt_peak_memory_mb"] > 0 and r["ckpt_vs_full_step"] > 0
            assert r["ckpt_vs_full_memory"] == pytest.approx(r["ckpt_peak_memory_mb"] / full["ckpt_peak_memory_mb"])


@pytest.mark.slow
def test_scale_out(tmp_path: Path, cache: Path) -> None:
    """Ray routing vs adapter-blind routing on a real local Ray (few requests here), same sequence."""
    pytest.importorskip("ray")
    affinity, blind, hop = _load(run("scale-out", replace(TINY, requests=120), tmp_path, cache, [30])[0])["rows"]
    for row in (affinity, blind):
        assert row["requests"] == 120 and 0 <= row["hit_rate"] <= 1
        assert row["registry_loads"] == sum(row["loads_per_replica"]) > 0
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p95"]
    assert affinity["vs_blind_loads"] == pytest.approx(blind["registry_loads"] / affinity["registry_loads"])
    assert hop["vs_direct"] == pytest.approx(hop["tok_s"] / hop["direct_tok_s"])
    with pytest.raises(InvalidArgument, match="--model tiny"):
        run("scale-out", Workload(model="smollm2-135m"), tmp_path, cache, [30])


def test_unknown_model_names_both_kinds() -> None:
    with pytest.raises(
        InvalidArgument, match=r"unknown model 'nope': a preset .*smollm2-135m.* real .*smollm2-135m-instruct"
    ):
        Workload(model="nope")


@pytest.mark.real
def test_packaged_model_is_the_real_base(tmp_path: Path, real_base: Path) -> None:
    """`--model smollm2-135m-instruct`: the fixtures serve the real checkpoint in place (nothing copied into the
    bench cache), the results say so, and what is derived from the base (prompts, proxy-tuning's small model)
    follows its config. No benchmark runs here."""
    from transformers import AutoConfig

    from hotswap.basemodel import PRESETS, fingerprint
    from hotswap.bench.common import REAL_SHAPES, Fixtures

    workload = Workload(model="smollm2-135m-instruct", prompt=8)
    fx = Fixtures(workload, tmp_path)
    assert fx.base == real_base and fx.fingerprint == fingerprint(real_base)
    assert not any(tmp_path.rglob("*.safetensors"))
    assert workload.label == "W1 shape, real weights (smollm2-135m-instruct)"
    config = AutoConfig.from_pretrained(real_base)
    preset = PRESETS[REAL_SHAPES[workload.model]]  # the label's claim: W1's shape
    assert config.model_type == preset.model_type
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings"):  # fmt: skip
        assert getattr(config, key) == preset.config[key], key
    assert all(0 <= t < config.vocab_size and len(p) == 8 for p in fx.prompts(2) for t in p)
    small = AutoConfig.from_pretrained(fx.proxy_small())
    assert (small.model_type, small.vocab_size, small.hidden_size) == ("llama", config.vocab_size, 144)
