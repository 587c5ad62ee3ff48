"""What the trainer asks of a method's trainable model (one place, shared by every method module).

Training runs on transformers' ``Trainer`` (``hotswap.train.hf``). A method changes what happens around the
optimizer step in three places only, each in its own folder: a term added to the loss (``penalty``, read by the
trainer's ``compute_loss``), ``TrainerCallback``s for its step behaviour (``callbacks``: DyLoRA's rank sampling,
PLoRA's offload, AdaLoRA's budget step, Child-tuning's per-step mask), and the state those callbacks keep beyond
the trainable parameters (``state`` / ``load_state``), which checkpoints carry so that a resumed run ends with the
same adapter as an uninterrupted one.

A callback reads only ``state.global_step`` and the ``optimizer`` keyword (``hotswap.bench.training``'s plain
loop calls them the same way): ``on_step_begin`` before the first micro-batch of a step, ``on_optimizer_step``
right after ``optimizer.step()`` (gradients still present), ``on_step_end`` after the step is counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from transformers import TrainerCallback

from hotswap.errors import InvalidArgument


class Trainable(Protocol):
    """A model being trained by one method."""

    model: torch.nn.Module

    def penalty(self) -> torch.Tensor | None:
        """A regulariser the method adds to each optimizer step's loss (e.g. AdaLoRA's orthogonality), or None."""
        ...

    def callbacks(self) -> list[TrainerCallback]:
        """The method's step behaviour as Trainer callbacks (none for most methods)."""
        ...

    def state(self) -> dict[str, torch.Tensor]:
        """What the method keeps beyond the trainable parameters, for checkpoints (may be empty)."""
        ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` on a freshly attached model whose trainable parameters are already restored."""
        ...

    def export(self, out: Path) -> dict[str, float]:
        """Write the artifact into ``out``; returns metrics of the export itself (may be empty)."""
        ...


class PlainSteps:
    """The defaults of most methods: no loss penalty, nothing to do between steps, no state of their own."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def callbacks(self) -> list[TrainerCallback]:
        return []

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise InvalidArgument(f"{type(self).__name__} keeps no state, got {', '.join(sorted(state))}")
