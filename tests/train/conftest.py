"""Training fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotswap.basemodel import build_model, save_model
from tests.conftest import SMALL


@pytest.fixture(scope="session")
def trainable_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shape with a wider init (std 0.1): its logits can get confident, so learning shows."""
    return save_model(build_model("tiny", seed=0, initializer_range=0.1), tmp_path_factory.mktemp("b") / "tiny")


@pytest.fixture(scope="session")
def trainable_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller model with ``trainable_base``'s vocabulary: proxy-tuning's expert starts from it."""
    model = build_model("tiny", seed=4, initializer_range=0.1, **SMALL)
    return save_model(model, tmp_path_factory.mktemp("b") / "small")
