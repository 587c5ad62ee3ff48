"""The trainable methods: an options dataclass per method, ``attach`` (make the model trainable the
method's way) and ``export`` (write the artifact).

PEFT does the work where it has the method (LoRA, DoRA, prefix, prompt), and the artifact is exactly
its ``save_pretrained`` output; AdaLoRA too, exported as LoRA at its final ranks (``hotswap.train.adalora``).
PLoRA and DyLoRA (``hotswap.train.plora``, ``.dylora``) are ours, on PEFT's LoRA layers.
BitFit is ours (PEFT has no bias-only method): trainable biases on the target linears (new zero
biases where the base has none), exported as bias deltas in hotswap's documented format, the same
the engine serves (see ``hotswap.train.synthetic.write_bitfit``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig
from safetensors.torch import load_file
from transformers import PreTrainedModel

from hotswap.errors import InvalidArgument
from hotswap.registry import HOTSWAP_CONFIG
from hotswap.train.adalora import AdaLoraOptions, attach_adalora
from hotswap.train.bottleneck import BottleneckOptions, attach_bottleneck
from hotswap.train.dylora import DyLoraOptions, attach_dylora
from hotswap.train.peft_common import attach, lora_config
from hotswap.train.plora import PLoraOptions, attach_plora
from hotswap.train.proxy import ProxyOptions, attach_proxy
from hotswap.train.sparse import ChildTuningOptions, SparseOptions, attach_sparse
from hotswap.train.synthetic import DEFAULT_TARGETS, write_bitfit
from hotswap.train.trainable import PlainSteps


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidArgument(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise InvalidArgument(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class VirtualTokenOptions:
    num_virtual_tokens: int = 8

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise InvalidArgument(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


@dataclass(frozen=True)
class BitFitOptions:
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)


@dataclass
class _Peft(PlainSteps):
    model: PeftModel

    def export(self, out: Path) -> dict[str, float]:
        self.model.save_pretrained(out)
        return {}


@dataclass
class _BitFit(PlainSteps):
    model: torch.nn.Module
    biases: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]  # module name -> (trainable bias, its start)
    target_modules: tuple[str, ...]

    def export(self, out: Path) -> dict[str, float]:
        deltas = {f"{name}.bias": (p.detach() - start).float().cpu() for name, (p, start) in self.biases.items()}
        write_bitfit(out, deltas, self.target_modules)
        return {}


def _peft(model: torch.nn.Module, config: Any) -> _Peft:
    return _Peft(attach(model, config))


def _bitfit(model: torch.nn.Module, opts: BitFitOptions) -> _BitFit:
    for p in model.parameters():
        p.requires_grad_(False)
    biases = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in opts.target_modules:
            if module.bias is None:
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
            module.bias.requires_grad_(True)
            biases[name] = (module.bias, module.bias.detach().clone())
    if not biases:
        raise InvalidArgument(f"no linear layer matches target modules {', '.join(opts.target_modules)}")
    return _BitFit(model, biases, opts.target_modules)


def _resume_peft(model: torch.nn.Module, parent: Path) -> _Peft:
    return _Peft(PeftModel.from_pretrained(model, parent, is_trainable=True))


def _resume_bitfit(model: torch.nn.Module, parent: Path) -> _BitFit:
    """Start from a published BitFit's biases; the export stays a delta against the base's biases."""
    config = json.loads((parent / HOTSWAP_CONFIG).read_text())
    trainable = _bitfit(model, BitFitOptions(tuple(config["target_modules"])))
    deltas = load_file(parent / "adapter_model.safetensors")
    for name, (bias, _start) in trainable.biases.items():
        if f"{name}.bias" in deltas:
            with torch.no_grad():
                bias += deltas[f"{name}.bias"].to(bias.dtype)
    return trainable


def _lora(model: torch.nn.Module, opts: LoraOptions, dora: bool) -> _Peft:
    return _peft(
        model, lora_config(opts.rank, opts.alpha, opts.target_modules, lora_dropout=opts.dropout, use_dora=dora)
    )


@dataclass(frozen=True)
class AttachContext:
    """What some methods need from the run when attaching."""

    steps: int  # total optimizer steps (AdaLoRA's budget schedule)
    loss_batches: Callable[[torch.nn.Module, int], Iterator[torch.Tensor]]  # losses of the first n batches (Fisher)


@dataclass(frozen=True)
class Method:
    options: type
    attach: Any  # (model, options, AttachContext) -> Trainable
    lr: float  # default learning rate (AdamW, linear decay): trains the built-in tasks well
    resume: Any = None  # (model, parent artifact dir) -> Trainable: fine-tune a published version further
    checkpointing: bool = True  # can train with gradient checkpointing (see enable_gradient_checkpointing)


def _prefix(model: torch.nn.Module, o: VirtualTokenOptions) -> _Peft:
    return _peft(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens))


def _prompt(model: torch.nn.Module, o: VirtualTokenOptions) -> _Peft:
    return _peft(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens))


METHODS: dict[str, Method] = {
    "lora": Method(LoraOptions, lambda m, o, _: _lora(m, o, dora=False), 5e-3, _resume_peft),
    "dora": Method(LoraOptions, lambda m, o, _: _lora(m, o, dora=True), 5e-3, _resume_peft),
    "adalora": Method(AdaLoraOptions, lambda m, o, ctx: attach_adalora(m, o, ctx.steps), 5e-3),
    "dylora": Method(DyLoraOptions, lambda m, o, _: attach_dylora(m, o), 5e-3),
    "plora": Method(PLoraOptions, lambda m, o, _: attach_plora(m, o), 5e-3),
    # prefix-tuning reaches the layers through the KV cache, which transformers drops in checkpointed layers
    "prefix": Method(VirtualTokenOptions, lambda m, o, _: _prefix(m, o), 3e-2, _resume_peft, checkpointing=False),
    "prompt": Method(VirtualTokenOptions, lambda m, o, _: _prompt(m, o), 1e-1, _resume_peft),
    "bitfit": Method(BitFitOptions, lambda m, o, _: _bitfit(m, o), 5e-2, _resume_bitfit),
    "bottleneck": Method(BottleneckOptions, lambda m, o, _: attach_bottleneck(m, o), 1e-2),
    "fishmask": Method(SparseOptions, lambda m, o, ctx: attach_sparse(m, o, "fishmask", ctx.loss_batches), 3e-2),
    "child-tuning": Method(
        ChildTuningOptions, lambda m, o, ctx: attach_sparse(m, o, "child-tuning", ctx.loss_batches), 1e-3
    ),
    "proxy": Method(ProxyOptions, lambda m, o, _: attach_proxy(m, o), 3e-3),
}


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
    if method not in METHODS:
        raise InvalidArgument(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[method].options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgument(
            f"option(s) {', '.join(unknown)} do not apply to {method} (its options: {', '.join(sorted(known))})"
        )
    if "target_modules" in options:
        options = {**options, "target_modules": tuple(options["target_modules"])}
    return cls(**options)
