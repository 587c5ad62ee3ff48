"""Prompt tuning (PEFT): learned virtual-token embeddings before the row's prompt."""

from __future__ import annotations

from hotswap.methods.api.peft_common import VirtualTokenOptions, resume_peft
from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.prompt.artifact import load_prompt, random_prompt, random_prompts
from hotswap.methods.prompt.train import attach_prompt

PROMPT = MethodSpec(
    name="prompt",
    summary="learned virtual-token embeddings before the prompt (PEFT)",
    load=load_prompt,
    options=VirtualTokenOptions,
    attach=lambda m, o, _: attach_prompt(m, o),
    lr=1e-1,
    resume=resume_peft,
    random=lambda base, outs, _: random_prompts(base, outs, num_virtual_tokens=16),
    context=True,
    peft_type="PROMPT_TUNING",
    peft=True,
    sharding=True,
)

__all__ = ["PROMPT", "random_prompt", "random_prompts"]
