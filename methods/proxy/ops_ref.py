"""Reference for proxy-tuning (Liu et al., "Tuning Language Models by Proxy"): every model's full
forward over the whole sequence, no cache, no batching. The engine's per-row cached version is
:class:`hotswap.methods.proxy.kind.ProxyKind`; training evaluates the ensemble with this module too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput


class ProxyTuned(nn.Module):
    """logits = base + alpha * (expert - anti_expert), the three models sharing one vocabulary.

    The offset applies to the text positions: a base that prepends virtual tokens (prompt tuning)
    keeps its extra leading positions unchanged.
    """

    def __init__(self, base: nn.Module, expert: nn.Module, anti_expert: nn.Module, alpha: float) -> None:
        super().__init__()
        self.base, self.expert, self.anti_expert, self.alpha = base, expert, anti_expert, alpha

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        def logits(model: nn.Module) -> torch.Tensor:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

        offset = logits(self.expert) - logits(self.anti_expert)  # (B, T, V)
        out = logits(self.base)  # (B, P + T, V), P virtual tokens
        out[:, -offset.shape[1] :] += self.alpha * offset
        return CausalLMOutput(logits=out)
