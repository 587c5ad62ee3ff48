"""hotswap.train: fine-tune and produce adapter artifacts; publishes only through hotswap.registry."""

from __future__ import annotations

from hotswap.train.synthetic import (
    DEFAULT_TARGETS,
    RandomLoraConfig,
    random_bitfit,
    random_lora,
    random_prefix,
    random_prompt,
)

__all__ = ["DEFAULT_TARGETS", "RandomLoraConfig", "random_bitfit", "random_lora", "random_prefix", "random_prompt"]
