"""What every method PEFT trains shares: the LoRA config from our options, attaching with PEFT's errors (e.g.
target modules the base lacks) turned into ours, and the trainable whose export is PEFT's ``save_pretrained``;
and what PEFT's virtual-token methods (prefix and prompt tuning) share: their option and their artifact's reader."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hotswap.errors import ArtifactRejected, InvalidArgument
from hotswap.formats import PEFT_CONFIG
from hotswap.methods.api.adapter import WEIGHTS, BaseInfo, read_json, read_tensors
from hotswap.methods.api.common import resolve_targets
from hotswap.methods.api.trainable import PlainSteps


def lora_config(
    model: torch.nn.Module, rank: int, alpha: float, target_modules: Sequence[str], **extra: Any
) -> LoraConfig:
    """PEFT's LoRA config for ``model`` (``all-linear`` resolved the one way: :func:`resolve_targets`)."""
    targets = list(resolve_targets(model, target_modules))
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", **extra)


def attach(model: torch.nn.Module, config: Any) -> PeftModel:
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError) as e:  # PEFT's errors for what a config cannot adapt (TypeError: a module type)
        raise InvalidArgument(f"cannot attach {config.peft_type.value}: {e}") from None


@dataclass(frozen=True)
class VirtualTokenOptions:
    num_virtual_tokens: int = field(
        default=8, metadata={"help": "learned tokens before the prompt", "flag": "virtual-tokens"}
    )

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise InvalidArgument(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


@dataclass
class PeftTrainable(PlainSteps):
    """A PEFT model being trained; its artifact is exactly PEFT's ``save_pretrained`` output."""

    model: PeftModel

    def export(self, out: Path) -> dict[str, float]:
        self.model.save_pretrained(out)
        return {}


def attach_peft(model: torch.nn.Module, config: Any) -> PeftTrainable:
    return PeftTrainable(attach(model, config))


def resume_peft(model: torch.nn.Module, parent: Path) -> PeftTrainable:
    """Continue training a published PEFT artifact."""
    return PeftTrainable(PeftModel.from_pretrained(model, parent, is_trainable=True))


def read_virtual(path: Path, ref: str, base: BaseInfo) -> tuple[dict, torch.Tensor]:
    """The PEFT config and the ``prompt_embeddings`` tensor, alone in the weights file."""
    config = read_json(path, PEFT_CONFIG, ref)
    tensors = read_tensors(path, ref, base)
    if extra := sorted(set(tensors) - {"prompt_embeddings"}):
        raise ArtifactRejected(f"{ref}: unexpected tensor {extra[0]!r} (expected only prompt_embeddings)")
    if "prompt_embeddings" not in tensors:
        raise ArtifactRejected(f"{ref}: {WEIGHTS} lacks tensor 'prompt_embeddings'")
    p = config.get("num_virtual_tokens")
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ArtifactRejected(f"{ref}: num_virtual_tokens must be a positive integer, got {p!r}")
    return config, tensors["prompt_embeddings"]
