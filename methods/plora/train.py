"""PLoRA (PeriodicLoRA): LoRA whose update is offloaded into the training copy of the backbone every
``period`` steps, so the accumulated update reaches rank up to T·r at LoRA's trainable-memory cost.

Offload with momentum m, per adapted linear (scale s = alpha / r):
    W <- W + (1 - m) · s · B A,    A <- m · A,    B <- m · B
m = 0 is a full offload and restart: B = 0 and A re-initialised (PEFT's LoRA init). The optimizer's
moments are reset at each offload (the factors restart). PEFT has no PLoRA, so this is ours, on top
of PEFT's LoRA layers. The offload is a ``TrainerCallback`` at the end of every K-th optimizer step;
checkpoints carry each offload's factors, and a resumed run replays them into the backbone it loads.

The served base stays frozen, so the artifact carries the accumulated delta
    ΔW = Σ_t (1 - m) · s · B_t A_t + s · B A   (the offloaded parts, then the live factors)
in PEFT's LoRA format: ``stacked`` factors of rank (T+1)·r (exact), or ``svd``-truncated to
``svd_rank`` with the retained energy (Σ kept σ² / Σ σ²) recorded in the run's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback, TrainerControl, TrainerState

from hotswap.errors import InvalidArgument
from hotswap.methods.api.common import DEFAULT_TARGETS, TARGETS_HELP
from hotswap.methods.api.peft_common import attach, lora_config
from hotswap.methods.api.trainable import PlainSteps
from hotswap.methods.lora.factors import write_lora_factors

EXPORTS = ("stacked", "svd")


@dataclass(frozen=True)
class PLoraOptions:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: the update is (alpha / r) B A"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": TARGETS_HELP, "flag": "targets"})
    period: int = field(default=50, metadata={"help": "K: optimizer steps between offloads into the backbone"})
    momentum: float = field(default=0.0, metadata={"help": "m in [0, 1): share of A, B kept at each offload"})
    export: str = field(
        default="stacked",
        metadata={"help": "exact stacked factors (rank (T+1) r) or an SVD truncation", "flag": "plora-export",
                  "choices": ("stacked", "svd")},
    )  # fmt: skip
    svd_rank: int | None = field(default=None, metadata={"help": "with the svd export: rank kept (unset: r)"})

    def __post_init__(self) -> None:
        if self.rank < 1 or self.period < 1:
            raise InvalidArgument(f"rank and period must be >= 1, got {self.rank} and {self.period}")
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(f"momentum must be in [0, 1), got {self.momentum}")
        if self.export not in EXPORTS:
            raise InvalidArgument(f"export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        if self.svd_rank is not None and (self.svd_rank < 1 or self.export != "svd"):
            raise InvalidArgument("svd_rank must be >= 1 and goes with export='svd'")


def _offloaded_b(b: torch.Tensor, momentum: float, scale: float) -> torch.Tensor:
    """The B factor of an offloaded part: (1 - m) · s · B, so that part_b @ A is what the offload added."""
    return b * ((1 - momentum) * scale)


def fold(layer: LoraLayer, adapter: str, b: torch.Tensor, a: torch.Tensor, momentum: float) -> None:
    """W <- W + (1 - m) · s · B A in the training copy of the backbone (an offload, or its replay on resume)."""
    base = layer.get_base_layer().weight
    with torch.no_grad():
        base += ((1 - momentum) * layer.scaling[adapter] * (b @ a)).to(base.dtype)


def offload(layer: LoraLayer, adapter: str, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One offload of ``layer`` (see the module docstring); returns the offloaded (B·(1-m)·s, A) pair."""
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    with torch.no_grad():
        part_b, part_a = _offloaded_b(b, momentum, layer.scaling[adapter]).detach().clone(), a.detach().clone()
        fold(layer, adapter, b, a, momentum)
        if momentum == 0:
            layer.reset_lora_parameters(adapter, init_lora_weights=True)  # B = 0, A re-initialised
        else:
            a.mul_(momentum)
            b.mul_(momentum)
    return part_b, part_a


@dataclass
class PLoraTrainable(PlainSteps):
    model: PeftModel
    options: PLoraOptions
    # per layer, the live (B, A) of each offload so far, on the CPU: what export and a resume replay from
    offloaded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def _layers(self) -> dict[str, LoraLayer]:
        """Adapted layers by their name in the base model (as in PEFT's saved keys)."""
        return {
            n.removeprefix("base_model.model."): m
            for n, m in self.model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A
        }

    def offload_all(self) -> None:
        for name, layer in self._layers().items():
            live = tuple(f["default"].weight.detach().to("cpu", copy=True) for f in (layer.lora_B, layer.lora_A))
            offload(layer, "default", self.options.momentum)
            self.offloaded.setdefault(name, []).append(live)

    def callbacks(self) -> list[TrainerCallback]:
        return [_Offload(self)]

    def state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{t}.{part}": tensor
            for name, parts in self.offloaded.items()
            for t, pair in enumerate(parts)
            for part, tensor in zip(("lora_B", "lora_A"), pair, strict=True)
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replay the checkpoint's offloads into the freshly loaded backbone: the same additions in the same order
        on the same device, so the backbone is bit-exact what the interrupted run had."""
        self.offloaded = {}
        for name, layer in self._layers().items():
            device = layer.lora_A["default"].weight.device
            t = 0
            while f"{name}.{t}.lora_B" in state:
                b, a = state.pop(f"{name}.{t}.lora_B"), state.pop(f"{name}.{t}.lora_A")
                fold(layer, "default", b.to(device), a.to(device), self.options.momentum)
                self.offloaded.setdefault(name, []).append((b, a))
                t += 1
        if state:
            raise InvalidArgument(f"PLoRA checkpoint state names layers this model lacks: {', '.join(sorted(state))}")

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (B, A) whose product is the whole accumulated delta ΔW (scale 1)."""
        out = {}
        m = self.options.momentum
        for name, layer in self._layers().items():
            s = layer.scaling["default"]
            live_b = (layer.lora_B["default"].weight * s).detach().cpu()
            live_a = layer.lora_A["default"].weight.detach().cpu()
            parts = [*((_offloaded_b(b, m, s), a) for b, a in self.offloaded.get(name, [])), (live_b, live_a)]
            b = torch.cat([p[0] for p in parts], dim=1)
            a = torch.cat([p[1] for p in parts], dim=0)
            if self.options.export == "svd":
                b, a = self._truncate(b @ a)
            out[name] = (b.float(), a.float())
        return out

    def _truncate(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.options.svd_rank or self.options.rank
        u, sigma, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        k = min(k, sigma.numel())
        energy = sigma.pow(2)
        kept, total = energy[:k].sum().item(), energy.sum().item()
        share = kept / total if total else 1.0
        self.metrics["svd_energy_kept_min"] = min(self.metrics.get("svd_energy_kept_min", 1.0), share)
        return u[:, :k] * sigma[:k], vh[:k]

    def export(self, out: Path) -> dict[str, float]:
        """PEFT LoRA files carrying ΔW (see ``hotswap.methods.lora.factors``)."""
        ranks = write_lora_factors(out, self.factors())
        offloads = max((len(v) for v in self.offloaded.values()), default=0)
        return {"plora_offloads": float(offloads), "plora_exported_rank": float(max(ranks.values())), **self.metrics}


class _Offload(TrainerCallback):
    """Every ``period`` optimizer steps: offload, and restart the optimizer's moments (the factors restart)."""

    def __init__(self, trainable: PLoraTrainable) -> None:
        self.trainable = trainable

    def on_step_end(
        self, args: object, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kwargs: object
    ) -> None:
        if state.global_step % self.trainable.options.period == 0:
            self.trainable.offload_all()
            optimizer.state.clear()


def attach_plora(model: torch.nn.Module, opts: PLoraOptions) -> PLoraTrainable:
    return PLoraTrainable(attach(model, lora_config(model, opts.rank, opts.alpha, opts.target_modules)), opts)
