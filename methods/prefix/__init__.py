"""Prefix tuning (PEFT): learned keys/values at the start of the row's cache in every layer."""

from __future__ import annotations

from hotswap.methods.api.peft_common import VirtualTokenOptions, resume_peft
from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.prefix.artifact import load_prefix, random_prefix, random_prefixes
from hotswap.methods.prefix.train import attach_prefix

# prefix-tuning reaches the layers through the KV cache, which transformers drops in checkpointed layers
PREFIX = MethodSpec(
    name="prefix",
    summary="learned key/value prefix in every layer (PEFT)",
    load=load_prefix,
    options=VirtualTokenOptions,
    attach=lambda m, o, _: attach_prefix(m, o),
    lr=3e-2,
    resume=resume_peft,
    checkpointing=False,
    random=lambda base, outs, _: random_prefixes(base, outs, num_virtual_tokens=16),
    context=True,
    peft_type="PREFIX_TUNING",
    peft=True,
    sharding=True,
)

__all__ = ["PREFIX", "VirtualTokenOptions", "random_prefix", "random_prefixes"]
