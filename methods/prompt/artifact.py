"""Prompt-tuning artifacts: PEFT's own files; the reader returns the virtual-token embeddings the engine puts before
the row's prompt."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peft import PromptTuningConfig

from hotswap.methods.api import BaseInfo, LoadedAdapter, check_shape
from hotswap.methods.api.common import PathLike, gaussian, save_variants
from hotswap.methods.api.peft_common import read_virtual
from hotswap.methods.prompt.kind import VirtualTokensKind


def load_prompt(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    config, emb = read_virtual(path, ref, base)  # (T, hidden)
    check_shape(ref, "prompt_embeddings", emb, (config["num_virtual_tokens"], base.hidden_size))
    return LoadedAdapter(ref=ref, method=method, parts={VirtualTokensKind.name: emb.to(base.dtype)})


def random_prompts(base: PathLike, outs: Mapping[PathLike, int], num_virtual_tokens: int = 8) -> list[Path]:
    """PEFT prompt-tuning adapters with random virtual-token embeddings."""
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return save_variants(base, lambda _model: config, outs, gaussian(0.05))


def random_prompt(base: PathLike, out_dir: PathLike, num_virtual_tokens: int = 8, seed: int = 0) -> Path:
    return random_prompts(base, {out_dir: seed}, num_virtual_tokens)[0]
