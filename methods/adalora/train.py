"""AdaLoRA through PEFT: SVD-form adapters (P Λ Q) whose rank budget is reallocated by importance
during training, then published as plain LoRA files with each layer's final rank.

PEFT does the method (``AdaLoraConfig``, ``update_and_allocate`` after each optimizer step: a
``TrainerCallback`` here, with the allocator's scores in checkpoints). Two things are ours: the
orthogonality penalty is added to our loss (PEFT adds it only to a loss the model computes from
labels, and the trainer computes its own loss), and the export: PEFT saves AdaLoRA's SVD
triplets, which no LoRA server loads, so we keep the unpruned triplets of each layer and write
B' = B[:, kept] · scale, A' = (A ⊙ E)[kept] -- the same delta, at the layer's final rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import AdaLoraConfig, PeftModel
from peft.tuners.adalora.layer import AdaLoraLayer
from transformers import TrainerCallback, TrainerControl, TrainerState

from hotswap.errors import InvalidArgument
from hotswap.methods.api.common import DEFAULT_TARGETS, TARGETS_HELP, resolve_targets
from hotswap.methods.api.peft_common import attach
from hotswap.methods.lora.factors import write_lora_factors


@dataclass(frozen=True)
class AdaLoraOptions:
    init_rank: int = field(default=12, metadata={"help": "starting rank of every layer"})
    target_rank: int = field(default=8, metadata={"help": "average rank per layer once the budget is final"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator of the update"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": TARGETS_HELP, "flag": "targets"})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "weight of the orthogonality penalty"})

    def __post_init__(self) -> None:
        if not 1 <= self.target_rank <= self.init_rank:
            raise InvalidArgument(f"need 1 <= target_rank <= init_rank, got {self.target_rank} and {self.init_rank}")
        if self.orth_reg_weight < 0:
            raise InvalidArgument(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")


@dataclass
class AdaLoraTrainable:
    model: PeftModel
    weight: float  # of the orthogonality penalty

    def _layers(self) -> dict[str, AdaLoraLayer]:
        return {
            n.removeprefix("base_model.model."): m
            for n, m in self.model.named_modules()
            if isinstance(m, AdaLoraLayer) and "default" in m.lora_A
        }

    def penalty(self) -> torch.Tensor | None:
        """AdaLoRA's orthogonality regulariser on P and Q, as PEFT computes it."""
        terms = []
        for layer in self._layers().values():
            for p, gram in ((layer.lora_A["default"], lambda t: t @ t.T), (layer.lora_B["default"], lambda t: t.T @ t)):
                cov = gram(p)
                terms.append(
                    torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype))
                )
        return self.weight * torch.stack(terms).mean() if terms else None

    def callbacks(self) -> list[TrainerCallback]:
        return [_BudgetStep(self.model)]

    def state(self) -> dict[str, torch.Tensor]:
        """The rank allocator's importance scores and, once the budget is final, the rank pattern."""
        allocator = self.model.base_model.rankallocator
        out = {f"{kind}:{name}": t for kind in _SCORES for name, t in getattr(allocator, kind).items()}
        pattern = self.model.peft_config["default"].rank_pattern or {}
        return out | {f"rank_pattern:{name}": torch.tensor(kept, dtype=torch.bool) for name, kept in pattern.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        allocator = self.model.base_model.rankallocator
        device = next(self.model.parameters()).device
        for kind in _SCORES:
            prefix = f"{kind}:"
            setattr(
                allocator,
                kind,
                {k.removeprefix(prefix): t.to(device) for k, t in state.items() if k.startswith(prefix)},
            )
        pattern = {
            k.removeprefix("rank_pattern:"): t.tolist() for k, t in state.items() if k.startswith("rank_pattern:")
        }
        if pattern:
            self.model.peft_config["default"].rank_pattern = pattern

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for name, layer in self._layers().items():
            a, e, b = (t["default"].detach() for t in (layer.lora_A, layer.lora_E, layer.lora_B))
            kept = e.squeeze(-1) != 0
            scale = layer.scaling["default"] / (layer.ranknum["default"].item() + 1e-5)  # PEFT's forward
            out[name] = (b[:, kept] * scale, (a * e)[kept])
        return out

    def export(self, out: Path) -> dict[str, float]:
        ranks = write_lora_factors(out, self.factors())
        return {"adalora_final_rank_total": float(sum(ranks.values())), "adalora_layers": float(len(ranks))}


_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT's RankAllocator: importance, its averages, uncertainty


class _BudgetStep(TrainerCallback):
    """PEFT's ``update_and_allocate`` after each optimizer step, while the gradients are still there (it scores
    importance by |p · grad|); the 1-based step number, as PEFT's budget schedule counts."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model

    def on_optimizer_step(self, args: object, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        self.model.base_model.update_and_allocate(state.global_step + 1)


def attach_adalora(model: torch.nn.Module, opts: AdaLoraOptions, steps: int) -> AdaLoraTrainable:
    tinit, tfinal = steps // 10, steps // 5  # warm up at full rank; keep the final budget for the last 20%
    if tinit + tfinal >= steps:
        tinit = tfinal = 0
    config = AdaLoraConfig(
        init_r=opts.init_rank,
        target_r=opts.target_rank,
        lora_alpha=opts.alpha,
        target_modules=list(resolve_targets(model, opts.target_modules)),
        total_step=steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, steps // 50),
        orth_reg_weight=opts.orth_reg_weight,
        task_type="CAUSAL_LM",
    )
    return AdaLoraTrainable(attach(model, config), opts.orth_reg_weight)
