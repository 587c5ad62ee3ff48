"""Prefix tuning (PEFT): learned keys/values at the start of the row's cache in every layer."""

from __future__ import annotations

from hotswap.methods.peft_common import resume_peft
from hotswap.methods.prefix.artifact import load_prefix, random_prefix, random_prefixes
from hotswap.methods.prefix.train import VirtualTokenOptions, attach_prefix
from hotswap.methods.spec import MethodSpec

# prefix-tuning reaches the layers through the KV cache, which transformers drops in checkpointed layers
PREFIX = MethodSpec(
    "prefix", "learned key/value prefix in every layer (PEFT)", load_prefix, VirtualTokenOptions,
    lambda m, o, _: attach_prefix(m, o), 3e-2, resume_peft, checkpointing=False,
    random=lambda base, outs, _: random_prefixes(base, outs, num_virtual_tokens=16), context=True, peft=True,
    sharding=True,
)  # fmt: skip

__all__ = ["PREFIX", "VirtualTokenOptions", "random_prefix", "random_prefixes"]
