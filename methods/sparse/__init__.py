"""Sparse selection (ours): FishMask and Child-tuning train a mask of the base's own weights and publish their
deltas, served as one stacked sparse product per layer."""

from __future__ import annotations

from hotswap.methods.sparse import kind  # noqa: F401 (registers the sparse slot kind)
from hotswap.methods.sparse.artifact import load_sparse, random_sparse, random_sparses
from hotswap.methods.sparse.train import ChildTuningOptions, SparseOptions, attach_sparse
from hotswap.methods.spec import MethodSpec

FISHMASK = MethodSpec(
    "fishmask", "a fixed mask of the weights with the most Fisher information", load_sparse, SparseOptions,
    lambda m, o, ctx: attach_sparse(m, o, "fishmask", ctx.loss_batches, ctx.seed), 3e-2, weight_decay=False,
    random=lambda base, outs, _: random_sparses(base, outs, "fishmask", density=0.005),
)  # fmt: skip
CHILD_TUNING = MethodSpec(
    "child-tuning", "a child network of the weights (Fisher mask, or per-step Bernoulli)", load_sparse,
    ChildTuningOptions, lambda m, o, ctx: attach_sparse(m, o, "child-tuning", ctx.loss_batches, ctx.seed), 1e-3,
    weight_decay=False,
    random=lambda base, outs, _: random_sparses(base, outs, "child-tuning", density=0.2),
)  # fmt: skip

__all__ = ["CHILD_TUNING", "FISHMASK", "ChildTuningOptions", "SparseOptions", "random_sparse", "random_sparses"]
