"""hotswap.train: fine-tune adapters on a frozen base (``train``, on transformers' ``Trainer``: ``hotswap.train.hf``);
publishes only through hotswap.registry.

The methods themselves (options, training, artifacts, and the synthetic artifacts tests and benchmarks use)
live in their folders under ``hotswap.methods``; the synthetic writers are re-exported here for convenience."""

from __future__ import annotations

from hotswap.methods.api.common import DEFAULT_TARGETS
from hotswap.methods.bitfit import BitFitOptions, random_bitfit, random_bitfits
from hotswap.methods.bottleneck import random_bottlenecks
from hotswap.methods.lora import LoraOptions, RandomLoraConfig, random_lora, random_loras
from hotswap.methods.prefix import VirtualTokenOptions, random_prefix, random_prefixes
from hotswap.methods.prompt import random_prompt, random_prompts
from hotswap.methods.proxy import random_proxies
from hotswap.methods.sparse import random_sparse, random_sparses
from hotswap.train.data import BUILTIN_TASKS, Dataset, Example, load_data
from hotswap.train.methods import trainable_methods
from hotswap.train.trainer import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_TARGETS",
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
    "trainable_methods",
]
