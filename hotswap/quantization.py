"""Quantized bases: the ``--quantize`` choices, the transformers config each one loads with, and what the base
fingerprint records of it.

A float checkpoint is quantized at load by transformers' own integrations: bitsandbytes NF4/FP4 (4-bit, blocks of
64, no double quantization) or int8 (LLM.int8's vector-wise int8, without its fp16 outlier columns), or torchao's
int8 weight-only. A checkpoint whose config already
carries a ``quantization_config`` (bitsandbytes, GPTQ, AWQ, compressed-tensors, torchao) loads as it is.

**The fingerprint rule.** The base fingerprint (:func:`hotswap.basemodel.fingerprint`) names the weights *as
served*: quantizing at load appends the quantization and its storage settings to the float checkpoint's
fingerprint (``hsfp1:…+bnb-nf4-b64``), and a pre-quantized checkpoint's config (with its ``quantization_config``) is
part of its fingerprint already. An adapter is served only on the base it was published for, so an adapter
trained on the NF4 base is refused on the float base and the other way round: the deltas were fitted to other
weights. To serve one adapter on both, publish it for each (``hotswap push --quantize nf4`` publishes against the
NF4 fingerprint).

Names only at import: the CLI imports this without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hotswap.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

QUANTIZE_NAMES = ("nf4", "fp4", "int8", "torchao-int8")
QUANTIZE_CHOICES = ("none", *QUANTIZE_NAMES)
# what the fingerprint records of each: the library, the format and the settings that decide the stored weights
_TAGS = {"nf4": "bnb-nf4-b64", "fp4": "bnb-fp4-b64", "int8": "bnb-int8-t0", "torchao-int8": "torchao-int8wo"}


def check_quantize(name: str) -> str | None:
    """``name`` as a quantization (None for ``none``), or :class:`InvalidArgument`."""
    if name not in QUANTIZE_CHOICES:
        raise InvalidArgument(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {name!r}")
    return None if name == "none" else name


def fingerprint_tag(name: str) -> str:
    """The suffix a base quantized at load adds to the float checkpoint's fingerprint."""
    return "+" + _TAGS[name]


def quantization_config(name: str, compute_dtype: torch.dtype) -> Any:
    """The transformers quantization config of ``name``; products run in ``compute_dtype``."""
    if name in ("nf4", "fp4"):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
        )  # fmt: skip
    if name == "int8":
        from transformers import BitsAndBytesConfig

        # No fp16 outlier columns (llm_int8_threshold 0): LLM.int8 picks them over the whole batch, so a row's
        # neighbours would move its result; rows stay independent, as every other path keeps them.
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())
