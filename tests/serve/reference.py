"""PEFT-side references for engine tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from hotswap.basemodel import load_model

# Where the family and dtype agreement tests run the engine and their references (scripts/gpu_check.sh: cuda).
TEST_DEVICE = os.environ.get("HOTSWAP_TEST_DEVICE", "cpu")


def peft_model(tiny_base: Path, adapter_dir: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    return PeftModel.from_pretrained(load_model(tiny_base, dtype=dtype, device=TEST_DEVICE), adapter_dir).eval()


def reference_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits over the prompt positions (prompt tuning's virtual tokens dropped), on the CPU."""
    t = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -len(ids) :].cpu()


def reference_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by recomputing the full forward each step. PEFT's generate() ignores prefix
    tuning under transformers 5.x, so its plain forward is the oracle for every method."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(reference_logits(model, seq)[-1].argmax()))
    return seq[len(ids) :]


def with_bias_deltas(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """BitFit's reference: ``model`` with the adapter's bias deltas added to its linears (a bias where none was)."""
    for key, delta in load_file(adapter / "adapter_model.safetensors").items():
        layer = model.get_submodule(key.removesuffix(".bias"))
        bias = delta if layer.bias is None else layer.bias.detach() + delta
        layer.bias = torch.nn.Parameter(bias.clone())
    return model
