"""Prefix-tuning artifacts: PEFT's own files. The reader turns the final key/value prefix into per-layer pairs the
engine writes at the start of the row's cache; ``read_virtual`` is shared with prompt-tuning's reader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PrefixTuningConfig

from hotswap.errors import ArtifactRejected
from hotswap.methods.common import PathLike, gaussian, save_variants
from hotswap.registry import PEFT_CONFIG
from hotswap.serve.adapters import WEIGHTS, BaseInfo, LoadedAdapter, check_shape, read_json, read_tensors


# -- Prefix and prompt tuning (PEFT format) -----------------------------------------------------------
def read_virtual(path: Path, ref: str, base: BaseInfo) -> tuple[dict, torch.Tensor]:
    """The PEFT config and the ``prompt_embeddings`` tensor, alone in the weights file."""
    config = read_json(path, PEFT_CONFIG, ref)
    tensors = read_tensors(path, ref, base)
    if extra := sorted(set(tensors) - {"prompt_embeddings"}):
        raise ArtifactRejected(f"{ref}: unexpected tensor {extra[0]!r} (expected only prompt_embeddings)")
    if "prompt_embeddings" not in tensors:
        raise ArtifactRejected(f"{ref}: {WEIGHTS} lacks tensor 'prompt_embeddings'")
    p = config.get("num_virtual_tokens")
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ArtifactRejected(f"{ref}: num_virtual_tokens must be a positive integer, got {p!r}")
    return config, tensors["prompt_embeddings"]


def load_prefix(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    config, emb = read_virtual(path, ref, base)  # (P, layers * 2 * kv_heads * head_dim), final KV
    layers = config.get("num_layers", base.num_layers)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers != base.num_layers:
        raise ArtifactRejected(f"{ref}: {PEFT_CONFIG} num_layers is {layers!r}; this base has {base.num_layers} layers")
    p = config["num_virtual_tokens"]
    check_shape(ref, "prompt_embeddings", emb, (p, base.num_layers * 2 * base.num_kv_heads * base.head_dim))
    # PEFT's get_prompt: view(P, L*2, kv, hd).permute -> (L*2, kv, P, hd); layer l uses [2l] as K, [2l+1] as V.
    kv = emb.view(p, base.num_layers * 2, base.num_kv_heads, base.head_dim).permute(1, 2, 0, 3).to(base.dtype)
    pairs = [(kv[2 * i].contiguous(), kv[2 * i + 1].contiguous()) for i in range(base.num_layers)]
    return LoadedAdapter(ref=ref, method=method, prefix_kv=pairs)


def random_prefixes(base: PathLike, outs: Mapping[PathLike, int], num_virtual_tokens: int = 8) -> list[Path]:
    """PEFT prefix-tuning adapters (no projection) with random key/value prefixes."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return save_variants(base, lambda _model: config, outs, gaussian(1.0))


def random_prefix(base: PathLike, out_dir: PathLike, num_virtual_tokens: int = 8, seed: int = 0) -> Path:
    return random_prefixes(base, {out_dir: seed}, num_virtual_tokens)[0]
