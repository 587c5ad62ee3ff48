"""Training's view of the method registry (``hotswap.methods``): each method's options dataclass, ``attach`` (make
the model trainable the method's way; its ``export`` writes the artifact), default learning rate, resume and
gradient-checkpointing support all come from the method's folder; this module only reads them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from hotswap.errors import InvalidArgument
from hotswap.methods import MethodSpec, registered


@dataclass(frozen=True)
class AttachContext:
    """What some methods need from the run when attaching."""

    steps: int  # total optimizer steps (AdaLoRA's budget schedule)
    loss_batches: Callable[[torch.nn.Module, int], Iterator[torch.Tensor]]  # losses of the first n batches (Fisher)
    seed: int = 0  # the run's seed (Child-tuning's per-step masks)


def trainable_methods() -> Mapping[str, MethodSpec]:
    """The registered methods ``hotswap train`` can train, by name."""
    return {name: spec for name, spec in registered().items() if spec.trainable}


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing on every checkpointable model inside ``model`` (the base under a
    PEFT wrapper, proxy-tuning's expert): each decoder layer keeps only its input and recomputes the rest in
    backward. Non-reentrant, so layers whose inputs need no gradient (frozen embeddings) still train."""
    kwargs = {"use_reentrant": False}
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing:
            if hasattr(m, "activation_checkpointing_enable"):  # the name since transformers 5.x
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def method_options(method: str, options: dict[str, Any]) -> Any:
    """The options dataclass of ``method`` from ``options``; an option the method lacks is an error."""
    methods = trainable_methods()
    if method not in methods:
        raise InvalidArgument(f"unknown method {method!r}; choose from {', '.join(methods)}")
    cls = methods[method].options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgument(
            f"option(s) {', '.join(unknown)} do not apply to {method} (its options: {', '.join(sorted(known))})"
        )
    if "target_modules" in options:
        options = {**options, "target_modules": tuple(options["target_modules"])}
    return cls(**options)
