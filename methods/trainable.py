"""What the trainer asks of a method's trainable model (one place, shared by every method module)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class Trainable(Protocol):
    """A model being trained by one method."""

    model: torch.nn.Module

    def penalty(self) -> torch.Tensor | None:
        """A regulariser the method adds to the loss (e.g. AdaLoRA's orthogonality), or None."""
        ...

    def after_step(self, step: int) -> bool:
        """Called after each optimizer step; True asks the trainer to restart the optimizer's state."""
        ...

    def export(self, out: Path) -> dict[str, float]:
        """Write the artifact into ``out``; returns metrics of the export itself (may be empty)."""
        ...


class PlainSteps:
    """The defaults of most methods: no loss penalty, nothing to do between steps."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> bool:
        return False
