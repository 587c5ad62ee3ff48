"""Prompt tuning (PEFT): learned virtual-token embeddings before the row's prompt."""

from __future__ import annotations

from hotswap.methods.peft_common import resume_peft
from hotswap.methods.prefix.train import VirtualTokenOptions
from hotswap.methods.prompt.artifact import load_prompt, random_prompt, random_prompts
from hotswap.methods.prompt.train import attach_prompt
from hotswap.methods.spec import MethodSpec

PROMPT = MethodSpec(
    "prompt", "learned virtual-token embeddings before the prompt (PEFT)", load_prompt, VirtualTokenOptions,
    lambda m, o, _: attach_prompt(m, o), 1e-1, resume_peft,
    random=lambda base, outs, _: random_prompts(base, outs, num_virtual_tokens=16), context=True, peft=True,
    sharding=True,
)  # fmt: skip

__all__ = ["PROMPT", "random_prompt", "random_prompts"]
