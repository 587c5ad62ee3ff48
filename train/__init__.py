"""hotswap.train: fine-tune and produce adapter artifacts; publishes only through hotswap.registry."""

from __future__ import annotations

from hotswap.train.synthetic import (
    DEFAULT_TARGETS,
    RandomLoraConfig,
    random_bitfit,
    random_bitfits,
    random_lora,
    random_loras,
    random_prefix,
    random_prefixes,
    random_prompt,
    random_prompts,
)

__all__ = [
    "DEFAULT_TARGETS",
    "RandomLoraConfig",
    "random_bitfit",
    "random_bitfits",
    "random_lora",
    "random_loras",
    "random_prefix",
    "random_prefixes",
    "random_prompt",
    "random_prompts",
]
