"""hotswap.train: fine-tune adapters on a frozen base (``train``), and synthetic adapters for tests and
benchmarks; publishes only through hotswap.registry."""

from __future__ import annotations

from hotswap.train.data import BUILTIN_TASKS, Dataset, Example, load_data
from hotswap.train.methods import METHODS, BitFitOptions, LoraOptions, VirtualTokenOptions
from hotswap.train.synthetic import (
    DEFAULT_TARGETS,
    RandomLoraConfig,
    random_bitfit,
    random_bitfits,
    random_bottlenecks,
    random_lora,
    random_loras,
    random_prefix,
    random_prefixes,
    random_prompt,
    random_prompts,
    random_proxies,
    random_sparse,
    random_sparses,
)
from hotswap.train.trainer import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_TARGETS",
    "METHODS",
    "BitFitOptions",
    "Dataset",
    "Example",
    "LoraOptions",
    "RandomLoraConfig",
    "TrainConfig",
    "TrainResult",
    "VirtualTokenOptions",
    "evaluate",
    "load_data",
    "random_bitfit",
    "random_bitfits",
    "random_bottlenecks",
    "random_lora",
    "random_loras",
    "random_prefix",
    "random_prefixes",
    "random_prompt",
    "random_prompts",
    "random_proxies",
    "random_sparse",
    "random_sparses",
    "train",
]
