"""Training fixtures."""

from __future__ import annotations

from collections.abc import Callable
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


@pytest.fixture(scope="session")
def family_bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """preset -> (a base of that family with ``trainable_base``'s wider init, a smaller model of the same family and
    vocabulary for proxy-tuning), each built once per session."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(preset: str) -> tuple[Path, Path]:
        if preset not in built:
            root = tmp_path_factory.mktemp(preset)
            base = save_model(build_model(preset, seed=0, initializer_range=0.1), root / "base")
            small = save_model(build_model(preset, seed=4, initializer_range=0.1, **SMALL), root / "small")
            built[preset] = (base, small)
        return built[preset]

    return get
