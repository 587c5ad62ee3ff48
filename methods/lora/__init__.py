"""LoRA and DoRA (PEFT): the reader also serves every method published in PEFT's LoRA format."""

from __future__ import annotations

from hotswap.methods.api.peft_common import resume_peft
from hotswap.methods.api.spec import MethodSpec, RandomKnobs
from hotswap.methods.lora.artifact import RandomLoraConfig, load_lora, random_lora, random_loras
from hotswap.methods.lora.train import LoraOptions, attach_lora


def _random(dora: bool):
    def make(base, outs, knobs: RandomKnobs):
        return random_loras(base, outs, RandomLoraConfig(rank=knobs.rank, alpha=knobs.alpha, use_dora=dora))

    return make


LORA = MethodSpec(
    name="lora",
    summary="low-rank update (alpha/r) B A on the target linears (PEFT)",
    load=load_lora,
    options=LoraOptions,
    attach=lambda m, o, _: attach_lora(m, o, dora=False),
    lr=5e-3,
    resume=resume_peft,
    random=_random(False),
    peft_type="LORA",
    peft=True,
    sharding=True,
)
DORA = MethodSpec(
    name="dora",
    summary="LoRA with a learned per-output magnitude (PEFT's DoRA)",
    load=load_lora,
    options=LoraOptions,
    attach=lambda m, o, _: attach_lora(m, o, dora=True),
    lr=5e-3,
    resume=resume_peft,
    random=_random(True),
    peft_type="LORA",
    peft=True,
    peft_flag="use_dora",
    sharding=True,
)

__all__ = ["DORA", "LORA", "LoraOptions", "RandomLoraConfig", "random_lora", "random_loras"]
