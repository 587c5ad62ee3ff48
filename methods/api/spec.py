"""What a method is to the rest of hotswap: one :class:`MethodSpec`, registered once.

Everything outside a method's folder (the serving loader dispatch, the registry's method detection, request
validation, ``hotswap train`` options, benchmark fixtures, the tests' every-method batches) reads this registry
and never names a method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotswap.methods.api.adapter import BaseInfo, LoadedAdapter

# (artifact dir, exact ref "name@3", method name, the served base) -> the adapter read and checked against it
Loader = Callable[[Path, str, str, BaseInfo], LoadedAdapter]


@dataclass(frozen=True)
class RandomKnobs:
    """What a benchmark or test fixes for every method's synthetic artifacts."""

    rank: int = 16  # LoRA-like ranks
    alpha: float = 32.0
    small: Callable[[], Path] | None = None  # a small checkpoint sharing the base's vocabulary (proxy-tuning)


# (base checkpoint dir, {out dir: seed}, knobs) -> the artifact dirs written, random non-zero weights
RandomArtifacts = Callable[[Path, Mapping[Path, int], RandomKnobs], list[Path]]


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    name: str  # as published in manifests and artifact configs ("lora", "child-tuning", ...)
    summary: str  # one line for help texts
    load: Loader  # the serving reader: validates the artifact against the base, returns host tensors
    options: type | None = None  # training options dataclass (each field's help in its metadata)
    attach: Callable[..., Any] | None = None  # (model, options, AttachContext) -> Trainable
    lr: float = 1e-3  # default learning rate for the built-in tasks
    resume: Callable[[Any, Path], Any] | None = None  # (model, parent artifact dir) -> Trainable
    checkpointing: bool = True  # trains with gradient checkpointing
    weight_decay: bool = True  # AdamW's weight decay may apply (False: it would move weights the method keeps exact)
    sharding: bool = False  # trains under DeepSpeed / FSDP: Trainer checkpoints and gathers it (no state of ours)
    random: RandomArtifacts | None = None  # synthetic artifacts with random non-zero weights (tests, benchmarks)
    context: bool = False  # changes the row's context (prefix/prompt): one per request, weight 1
    ranked: bool = False  # a request may ask for a lower rank (DyLoRA)
    peft: bool = False  # the artifact is PEFT's own format (PeftModel.from_pretrained loads it)
    # the adapter_config.json peft_type published artifacts of this method are detected by, and the config flag that
    # must be true to tell it from another method of the same peft_type (DoRA's use_dora)
    peft_type: str | None = None
    peft_flag: str | None = None
    title: str = ""  # how messages name it ("DyLoRA"); the name when empty

    @property
    def display(self) -> str:
        return self.title or self.name

    @property
    def trainable(self) -> bool:
        return self.attach is not None


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Register one method; a name registers once."""
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def registered() -> Mapping[str, MethodSpec]:
    """Every registered method by name, in registration order."""
    return _METHODS


def peft_method(config: Mapping[str, Any]) -> str | None:
    """The registered method a PEFT ``adapter_config.json`` is (by its ``peft_type`` and flags), or None."""
    matches = [s for s in _METHODS.values() if s.peft_type is not None and s.peft_type == config.get("peft_type")]
    flagged = [s for s in matches if s.peft_flag is not None and config.get(s.peft_flag) is True]
    plain = [s for s in matches if s.peft_flag is None]
    found = flagged or plain
    return found[0].name if found else None
