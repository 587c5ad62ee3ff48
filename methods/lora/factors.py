"""Write PEFT LoRA files from per-layer factors: the artifact of every method whose update is a
low-rank delta but whose trained form is not plain LoRA (PLoRA's accumulated delta, AdaLoRA's
pruned SVD triplets). The result is exactly what ``PeftModel.from_pretrained`` and the engine's LoRA
path load."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from hotswap.errors import InvalidArgument


def write_lora_factors(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """``factors``: module name in the base (``model.layers.0.self_attn.q_proj``) -> (B (out, r), A (r, in))
    with ΔW = B A, scale 1. Each module keeps its own rank (``rank_pattern``, alpha = rank); modules of
    rank 0 are left out. Returns the ranks written."""
    ranks = {name: a.shape[0] for name, (_, a) in factors.items() if a.shape[0] > 0}
    if not ranks:
        raise InvalidArgument("every adapted layer has rank 0: there is no delta to publish")
    top = max(ranks.values())
    state = {}
    for name in ranks:
        b, a = factors[name]
        state[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks),  # full names: PEFT matches them exactly
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),  # alpha = rank: scale 1, the factors carry the scale
        task_type="CAUSAL_LM",
    ).save_pretrained(out)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return ranks
