"""Prefix-tuning artifacts: PEFT's own files. The reader turns the final key/value prefix into per-layer pairs the
engine writes at the start of the row's cache."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peft import PrefixTuningConfig

from hotswap.errors import ArtifactRejected
from hotswap.formats import PEFT_CONFIG
from hotswap.methods.api import BaseInfo, LoadedAdapter, check_shape
from hotswap.methods.api.common import PathLike, gaussian, save_variants
from hotswap.methods.api.peft_common import read_virtual
from hotswap.methods.prefix.kind import PrefixKind


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
    return LoadedAdapter(ref=ref, method=method, parts={PrefixKind.name: pairs})


def random_prefixes(base: PathLike, outs: Mapping[PathLike, int], num_virtual_tokens: int = 8) -> list[Path]:
    """PEFT prefix-tuning adapters (no projection) with random key/value prefixes."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return save_variants(base, lambda _model: config, outs, gaussian(1.0))


def random_prefix(base: PathLike, out_dir: PathLike, num_virtual_tokens: int = 8, seed: int = 0) -> Path:
    return random_prefixes(base, {out_dir: seed}, num_virtual_tokens)[0]
