"""What a PEFT LoRA config says of one adapted module or parameter: its rank and its scaling."""

from __future__ import annotations

import math

from peft import LoraConfig
from peft.utils.other import get_pattern_key

from hotswap.errors import ArtifactRejected
from hotswap.formats import PEFT_CONFIG


def rank_and_scaling(ref: str, config: LoraConfig, name: str) -> tuple[int, float]:
    """The rank r of ``name`` (a module's, or a ``module.parameter``'s full path in the base model, as PEFT matches
    its rank and alpha patterns) and its scaling alpha / r (alpha / sqrt(r) with rsLoRA)."""
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ArtifactRejected(f"{ref}: {name}'s rank in {PEFT_CONFIG} must be a positive integer, got {r!r}")
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    return r, alpha / (math.sqrt(r) if config.use_rslora else r)
