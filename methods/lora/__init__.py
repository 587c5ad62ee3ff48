"""LoRA and DoRA (PEFT): the reader also serves every method published in PEFT's LoRA format."""

from __future__ import annotations

from hotswap.methods.lora.artifact import RandomLoraConfig, load_lora, random_lora, random_loras
from hotswap.methods.lora.train import LoraOptions, attach_lora
from hotswap.methods.peft_common import resume_peft
from hotswap.methods.spec import MethodSpec, RandomKnobs


def _random(dora: bool):
    def make(base, outs, knobs: RandomKnobs):
        return random_loras(base, outs, RandomLoraConfig(rank=knobs.rank, alpha=knobs.alpha, use_dora=dora))

    return make


LORA = MethodSpec(
    "lora", "low-rank update (alpha/r) B A on the target linears (PEFT)", load_lora, LoraOptions,
    lambda m, o, _: attach_lora(m, o, dora=False), 5e-3, resume_peft, random=_random(False), peft=True,
    sharding=True,
)  # fmt: skip
DORA = MethodSpec(
    "dora", "LoRA with a learned per-output magnitude (PEFT's DoRA)", load_lora, LoraOptions,
    lambda m, o, _: attach_lora(m, o, dora=True), 5e-3, resume_peft, random=_random(True), peft=True,
    sharding=True,
)  # fmt: skip

__all__ = ["DORA", "LORA", "LoraOptions", "RandomLoraConfig", "random_lora", "random_loras"]
