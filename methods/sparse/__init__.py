"""Sparse selection (ours): FishMask and Child-tuning train a mask of the base's own weights and publish their
deltas, served as one stacked sparse product per layer."""

from __future__ import annotations

from hotswap.methods.api.spec import MethodSpec
from hotswap.methods.sparse import kind  # noqa: F401 (registers the sparse slot kind)
from hotswap.methods.sparse.artifact import load_sparse, random_sparse, random_sparses
from hotswap.methods.sparse.train import ChildTuningOptions, SparseOptions, attach_sparse

FISHMASK = MethodSpec(
    name="fishmask",
    summary="a fixed mask of the weights with the most Fisher information",
    load=load_sparse,
    options=SparseOptions,
    attach=lambda m, o, ctx: attach_sparse(m, o, "fishmask", ctx.loss_batches, ctx.seed),
    lr=3e-2,
    weight_decay=False,
    random=lambda base, outs, _: random_sparses(base, outs, "fishmask", density=0.005),
)
CHILD_TUNING = MethodSpec(
    name="child-tuning",
    summary="a child network of the weights (Fisher mask, or per-step Bernoulli)",
    load=load_sparse,
    options=ChildTuningOptions,
    attach=lambda m, o, ctx: attach_sparse(m, o, "child-tuning", ctx.loss_batches, ctx.seed),
    lr=1e-3,
    weight_decay=False,
    random=lambda base, outs, _: random_sparses(base, outs, "child-tuning", density=0.2),
)

__all__ = ["CHILD_TUNING", "FISHMASK", "ChildTuningOptions", "SparseOptions", "random_sparse", "random_sparses"]
