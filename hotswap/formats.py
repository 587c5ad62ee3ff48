"""The adapter artifact's file names: one place for the registry (which checks artifacts) and the method folders
(which write and read them)."""

from __future__ import annotations

PEFT_CONFIG = "adapter_config.json"  # PEFT's own config (peft_type ...), where PEFT has the method
HOTSWAP_CONFIG = "hotswap_config.json"  # hotswap's config (a "method" field) for the methods PEFT lacks
WEIGHTS = "adapter_model.safetensors"  # the weights, safetensors only
