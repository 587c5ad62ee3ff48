"""Proxy-tuning (Liu et al., "Tuning Language Models by Proxy"): fine-tune a small model (the expert)
on the task; at decode time the large base is steered by the difference between the expert and the
untuned small model (the anti-expert): logits = base + alpha * (expert - anti_expert). The base is
never touched, and the two small models must share its vocabulary. PEFT has no proxy-tuning, so this
is ours.

Training follows the paper: the expert is fully fine-tuned on its own next-token loss; evaluation
(eval loss and accuracy in the run's metrics) is of the proxy-tuned ensemble, which is what serving
produces. The artifact holds both small checkpoints (``hotswap.methods.proxy.artifact.write_proxy``); the
engine serves it per row (``hotswap.methods.proxy.kind``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from hotswap.basemodel import load_model
from hotswap.errors import HotswapError, InvalidArgument
from hotswap.methods.api.trainable import PlainSteps
from hotswap.methods.proxy.artifact import write_proxy
from hotswap.methods.proxy.ops_ref import ProxyTuned


@dataclass(frozen=True)
class ProxyOptions:
    small_model: str = field(
        default="",
        metadata={
            "help": "small checkpoint sharing the base's vocabulary (the anti-expert; the expert starts from it)"
        },
    )
    alpha: float = field(default=1.0, metadata={"help": "strength of the logit offset"})

    def __post_init__(self) -> None:
        if not self.small_model:
            raise InvalidArgument("proxy needs small_model: a small checkpoint sharing the base's vocabulary")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InvalidArgument(f"alpha must be a finite number > 0, got {self.alpha}")


class ProxyTraining(ProxyTuned):
    """In training mode the expert alone (it learns the task by itself); in eval mode the ensemble."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        if self.training:
            return self.expert(input_ids=input_ids, attention_mask=attention_mask)
        return super().forward(input_ids, attention_mask)

    def train(self, mode: bool = True) -> ProxyTraining:
        """Only the expert changes mode; the base and anti-expert stay frozen in eval mode."""
        self.training = mode
        self.expert.train(mode)
        return self


@dataclass
class ProxyTrainable(PlainSteps):
    model: ProxyTraining

    def export(self, out: Path) -> dict[str, float]:
        write_proxy(out, self.model.expert, self.model.anti_expert, self.model.alpha)
        return {}


def attach_proxy(model: nn.Module, opts: ProxyOptions) -> ProxyTrainable:
    try:
        # float32 whatever the base's dtype: the expert is what trains (the ensemble adds logits in float32)
        anti_expert = load_model(opts.small_model, dtype=torch.float32, device=next(model.parameters()).device)
    except HotswapError as e:
        raise InvalidArgument(f"small_model: {e}") from e
    base_vocab, small_vocab = model.config.vocab_size, anti_expert.config.vocab_size
    if small_vocab != base_vocab:
        raise InvalidArgument(
            f"small_model has vocabulary size {small_vocab}, the base {base_vocab}: proxy-tuning needs a shared one"
        )
    model.requires_grad_(False)
    expert = copy.deepcopy(anti_expert).requires_grad_(True)
    return ProxyTrainable(ProxyTraining(model, expert, anti_expert, opts.alpha))
