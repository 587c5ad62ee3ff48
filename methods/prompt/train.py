"""Prompt-tuning training: PEFT does the method (options shared with prefix-tuning)."""

from __future__ import annotations

import torch
from peft import PromptTuningConfig

from hotswap.methods.api.peft_common import PeftTrainable, VirtualTokenOptions, attach_peft


def attach_prompt(model: torch.nn.Module, o: VirtualTokenOptions) -> PeftTrainable:
    return attach_peft(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens))
