"""Sparse selection: train a subset of the base's own weights and publish only their deltas.

- ``fishmask``: a fixed mask of the top ``density`` fraction of the target linears' weights by Fisher
  information (squared gradients of the loss, summed over a few training batches), chosen once across
  all target layers; only masked weights train.
- ``child-tuning``: the "child network". Variant ``d`` (task-driven, default) selects it like
  FishMask, by Fisher information, typically denser (``density`` 0.2). Variant ``f`` (task-free)
  draws a fresh Bernoulli(``density``) mask over the gradients at every optimizer step (seeded by the
  run's seed, the step and the layer, so every micro-batch and process of a step agrees) and scales kept
  gradients by 1/density; the published delta is whatever changed, so it densifies with steps
  (about 1 - (1 - density)^steps of the weights).

PEFT has neither, so they are ours. The mask is applied to the gradients (hooks), and AdamW without
weight decay never moves a weight whose gradient is always zero, so untouched weights stay bit-exact
(tested); weight decay would move every weight, so these methods refuse it (``MethodSpec.weight_decay``).
The optimizer keeps dense moments for the target matrices: memory like full fine-tuning of those
layers (a sparse optimizer would fix that; not needed at the sizes served here).

Artifact: ``hotswap.methods.sparse.artifact.write_sparse`` (flat indices + values per linear).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from hotswap.errors import InvalidArgument
from hotswap.methods.api.common import DEFAULT_TARGETS, TARGETS_HELP, adapted_linears, target_names
from hotswap.methods.api.trainable import PlainSteps
from hotswap.methods.sparse.artifact import write_sparse

VARIANTS = ("d", "f")


@dataclass(frozen=True)
class SparseOptions:
    """FishMask's options."""

    density: float = field(default=0.005, metadata={"help": "share of the target weights that train"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": TARGETS_HELP, "flag": "targets"})
    fisher_batches: int = field(default=8, metadata={"help": "training batches whose squared gradients give Fisher"})

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise InvalidArgument(f"density must be in (0, 1], got {self.density}")
        if self.fisher_batches < 1:
            raise InvalidArgument(f"fisher_batches must be >= 1, got {self.fisher_batches}")


@dataclass(frozen=True)
class ChildTuningOptions(SparseOptions):
    density: float = field(default=0.2, metadata={"help": "the child network's share of the weights"})
    variant: str = field(
        default="d",
        metadata={"help": "d: Fisher-selected, fixed; f: task-free Bernoulli per step", "choices": ("d", "f")},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise InvalidArgument(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


def fisher_information(
    weights: dict[str, torch.nn.Parameter], losses: Iterator[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Sum of squared gradients of each weight over the given losses (the diagonal empirical Fisher)."""
    fisher = {name: torch.zeros_like(w) for name, w in weights.items()}
    for loss in losses:
        for w in weights.values():
            w.grad = None
        loss.backward()
        for name, w in weights.items():
            if w.grad is not None:
                fisher[name] += w.grad.detach() ** 2
    for w in weights.values():
        w.grad = None
    return fisher


def top_mask(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the ``density`` share of all entries with the highest score (across layers)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, round(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, sorted=False).indices] = True  # exactly k, ties broken by topk
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


@dataclass
class SparseTrainable(PlainSteps):
    model: torch.nn.Module
    method: str
    options: SparseOptions
    weights: dict[str, torch.nn.Parameter]  # module name -> its trainable weight
    start: dict[str, torch.Tensor]  # the weights before training
    masks: dict[str, torch.Tensor] | None  # fixed masks (fishmask, child-tuning d); None for variant f
    seed: int = 0  # variant f: its masks are drawn from (seed, step, layer)
    step: int = 0  # variant f: the optimizer step being computed (0-based), set at each step's start

    def callbacks(self) -> list[TrainerCallback]:
        return [] if self.masks is not None else [_StepMasks(self)]

    def bernoulli(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """Variant f: ``grad`` masked by a fresh Bernoulli(p) draw, kept entries scaled by 1/p. The draw depends on
        (seed, step, layer) only, so the micro-batches of a step, data-parallel processes and a resumed run all
        draw the same mask."""
        p = self.options.density
        key = ((self.seed * 1_000_003 + self.step) * 1_000_003 + index) % 2**63  # one seed per (seed, step, layer)
        gen = torch.Generator(grad.device).manual_seed(key)
        return grad * (torch.rand(grad.shape, generator=gen, device=grad.device) < p) / p

    def export(self, out: Path) -> dict[str, float]:
        deltas = {}
        for name, w in self.weights.items():
            diff = (w.detach() - self.start[name]).flatten().float().cpu()
            idx = (self.masks[name].flatten().cpu().nonzero() if self.masks else diff.nonzero()).flatten()
            deltas[name] = (idx, diff[idx])
        write_sparse(out, deltas, self.method, target_names(self.weights))
        total = sum(w.numel() for w in self.weights.values())
        nnz = sum(int(i.numel()) for i, _ in deltas.values())
        everything = sum(p.numel() for p in self.model.parameters())
        # what actually trained: the mask (or, task-free, what changed), not the whole target matrices
        return {"trainable_params": nnz, "trainable_pct": 100 * nnz / everything, "sparse_density": nnz / total}


class _StepMasks(TrainerCallback):
    def __init__(self, trainable: SparseTrainable) -> None:
        self.trainable = trainable

    def on_step_begin(self, args: object, state: TrainerState, control: TrainerControl, **kwargs: object) -> None:
        self.trainable.step = state.global_step


def attach_sparse(
    model: torch.nn.Module,
    opts: SparseOptions,
    method: str,
    loss_batches: Callable[[torch.nn.Module, int], Iterator[torch.Tensor]],
    seed: int,
) -> SparseTrainable:
    """Freeze everything but the target linears' weights, pick the mask, and hook the gradients."""
    model.requires_grad_(False)
    weights = {name: module.weight for name, module in adapted_linears(model, opts.target_modules).items()}
    if half := next((w.dtype for w in weights.values() if w.dtype != torch.float32), None):
        name = str(half).removeprefix("torch.")
        raise InvalidArgument(f"{method} trains the base's own weights, whose small updates {name} would lose: "
                              "train it with dtype float32")  # fmt: skip
    for w in weights.values():
        w.requires_grad_(True)
    start = {name: w.detach().clone() for name, w in weights.items()}
    masks = None
    if getattr(opts, "variant", "d") == "d":
        masks = top_mask(fisher_information(weights, loss_batches(model, opts.fisher_batches)), opts.density)
    trainable = SparseTrainable(model, method, opts, weights, start, masks, seed)
    for index, (name, w) in enumerate(weights.items()):
        if masks is not None:
            mask = masks[name].to(w.device)
            w.register_hook(lambda g, m=mask: g * m)
        else:  # task-free: a fresh Bernoulli mask per step, kept gradients scaled by 1/p
            w.register_hook(lambda g, i=index: trainable.bernoulli(i, g))
    return trainable
