"""Serving in half precision on the CPU, and the ``auto`` device/dtype rules.

Tolerance in half precision: hotswap casts adapter weights to the serving dtype once at load, while PEFT keeps
them in float32 (its autocast_adapter_dtype) and adds their output before rounding, so the two round differently;
their logits agree within 2% (bf16) / 0.3% (fp16) of the largest logit, and the greedy tokens are equal on every
prompt whose greedy steps all have a top-2 margin (in PEFT) clear of that tolerance: elsewhere a step is a coin
toss for both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hotswap import devices
from hotswap.basemodel import build_model, fingerprint, load_model, save_model
from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.train import RandomLoraConfig, random_lora
from tests.serve.reference import TEST_DEVICE, peft_model, reference_logits

TOLERANCE = {"bfloat16": 0.02, "float16": 0.003}  # of max |logit|
PROMPTS = [[(7 * i + 5 * j) % 250 + 3 for j in range(4 + 2 * i)] for i in range(10)]
NEW = 5


def _greedy_with_margins(model: torch.nn.Module, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    seq, margins = list(ids), []
    for _ in range(n):
        logits = reference_logits(model, seq)[-1].float()
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        seq.append(int(logits.argmax()))
    return seq[len(ids) :], margins


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_rows_match_peft_in_that_dtype(preset: str, dtype: str, tmp_path: Path) -> None:
    base = save_model(build_model(preset, seed=0, initializer_range=0.1), tmp_path / "base")
    lora = random_lora(base, tmp_path / "lora", RandomLoraConfig(rank=4, seed=1, init_std=0.05))
    registry = Registry(tmp_path / "registry")
    registry.publish(lora, "lora", base_fingerprint=fingerprint(base))
    rows = [[] if i % 2 else ["lora"] for i in range(len(PROMPTS))]
    requests = [
        Request(prompt_ids=p, adapters=a, max_new_tokens=NEW, ignore_eos=True)
        for p, a in zip(PROMPTS, rows, strict=True)
    ]
    with Engine(base, registry, max_batch=len(PROMPTS), max_seq_len=64, dtype=dtype, device=TEST_DEVICE) as engine:
        assert engine.model.dtype == devices.torch_dtype(dtype)
        assert engine.runner.cache.k.dtype == devices.torch_dtype(dtype), "the KV cache is in the serving dtype"
        logits = [x.cpu() for x in engine.forward_logits(requests)]
        tokens = [r.token_ids for r in engine.generate(requests)]
    half = load_model(base, dtype=devices.torch_dtype(dtype), device=TEST_DEVICE)
    tolerance, compared = TOLERANCE[dtype], 0
    for ids, adapters, ours, got in zip(PROMPTS, rows, logits, tokens, strict=True):
        model = peft_model(base, lora, devices.torch_dtype(dtype)) if adapters else half
        ref = reference_logits(model, ids).float()
        assert (ours - ref).abs().max() <= tolerance * ref.abs().max()
        expected, margins = _greedy_with_margins(model, ids, NEW)
        if min(margins) > tolerance * ref.abs().max():
            assert got == expected
            compared += 1
    assert compared >= 2, "too few prompts with clear margins: this would compare nothing"


def _checkpoint_with_dtype(tmp_path: Path, dtype: str) -> Path:
    base = save_model(build_model("tiny", seed=0), tmp_path / f"base-{dtype}")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": dtype}))
    return base


def test_auto_dtype_follows_the_checkpoint_and_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bf16, fp16 = _checkpoint_with_dtype(tmp_path, "bfloat16"), _checkpoint_with_dtype(tmp_path, "float16")
    fp32 = _checkpoint_with_dtype(tmp_path, "float32")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.resolve_dtype("auto", bf16, "cpu") == "bfloat16"
    assert devices.resolve_dtype("auto", fp16, "cpu") == "float32", "no fast float16 on a CPU"
    assert devices.resolve_dtype("auto", fp32, "cpu") == "float32"
    assert devices.resolve_dtype("auto", fp16, "cuda") == "float16"
    assert devices.resolve_dtype("float16", fp32, "cpu") == "float16", "an explicit dtype is obeyed"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.resolve_dtype("auto", bf16, "cpu") == "float32"
    assert devices.resolve_dtype("auto", bf16, "cuda") == "bfloat16"
    with pytest.raises(InvalidArgument, match="dtype must be one of auto, float32"):
        devices.resolve_dtype("float64", fp32, "cpu")


def test_engine_settles_auto_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    with Engine(_checkpoint_with_dtype(tmp_path, "bfloat16"), tmp_path / "registry", max_batch=2) as engine:
        assert (engine.config.device, engine.config.dtype) == (devices.resolve_device("auto"), "bfloat16")
        assert engine.model.dtype == torch.bfloat16
        assert engine.generate([Request(prompt_ids=[5, 6, 7], max_new_tokens=3)])[0].token_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line() -> None:
    assert devices.resolve_device("auto") == "cpu"
    with pytest.raises(InvalidArgument, match="torch sees no CUDA device"):
        devices.resolve_device("cuda")
    with pytest.raises(InvalidArgument, match="device must be one of auto, cpu, cuda"):
        devices.resolve_device("tpu")
