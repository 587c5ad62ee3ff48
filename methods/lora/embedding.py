"""LoRA beyond the blocks' linears, as PEFT stores it: LoRA on the input embedding (``lora_embedding_A/B``), trainable
token rows (``trainable_token_indices``: new values for some tokens' embeddings, and their output head rows where the
head is tied to the embedding). The output head's plain LoRA is a linear's (:mod:`.kind`). Each is a per-row delta,
never written into the base's tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn

from hotswap.errors import ArtifactRejected, UnsupportedAdapter
from hotswap.methods.api import BaseInfo, BatchPlan, EmbeddingKind, LinearDelta, SlotKind, check_shape, register_kind
from hotswap.methods.lora.config import rank_and_scaling
from hotswap.methods.lora.kind import put_ranked


def _embed_scale(embedding: nn.Module) -> torch.Tensor | float:
    """The factor a family's embedding applies to its rows (Gemma's sqrt(hidden)); PEFT scales the deltas by it."""
    return getattr(embedding, "embed_scale", 1.0)


@dataclass(frozen=True)
class EmbeddingLoraFactors:
    """LoRA on the input embedding: A (V, r) (PEFT's ``lora_embedding_A`` transposed) and B (r, hidden) with the
    scaling folded in: a token's delta is A[token] @ B."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[1]


@dataclass(frozen=True)
class TokenRows:
    """New rows for some tokens, as deltas from the base's: ``ids`` (n,) and ``delta`` (n, hidden)."""

    ids: torch.Tensor
    delta: torch.Tensor


def _weighted(plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
    assert plan.slots is not None and plan.weights is not None
    return plan.slots, plan.weights


@register_kind
class EmbeddingLoraKind(EmbeddingKind):
    """Slot tables A (slots+1, V, R), B (slots+1, R, hidden) padded to a common rank; each of a row's K adapters adds
    A[slot][token] @ B[slot] (K batched matmuls)."""

    name = "embedding_lora"

    def __init__(self, base: nn.Module, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        vocab, hidden = base.weight.shape
        self.A, self.B = self._empty(vocab, 0), self._empty(0, hidden)
        self.slot_rank = [0] * (num_slots + 1)

    def set(self, slot: int, payload: EmbeddingLoraFactors | None) -> None:
        self.A = put_ranked(self.A, slot, None if payload is None else payload.A, 1)  # (V, r) per slot
        self.B = put_ranked(self.B, slot, None if payload is None else payload.B, 0)  # (r, hidden)
        self.slot_rank[slot] = 0 if payload is None else payload.rank

    def holds(self, slot: int) -> bool:
        return self.slot_rank[slot] > 0

    def gather(self, plan: BatchPlan, used: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _weighted(plan)

    def apply(self, ids: torch.Tensor, y: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        slots, weights = state
        scale = _embed_scale(self.base)
        for k in range(slots.shape[1]):
            s = slots[:, k]
            b = self.B[s] * (weights[:, k, None, None].to(self.dtype) * scale)  # (Bt, R, hidden)
            y = y + torch.bmm(self.A[s[:, None], ids], b)  # (Bt, T, R) @ (Bt, R, hidden)
        return y


class _RowTables:
    """Per slot, a table from token to its row (0: none) and the rows' deltas (row 0 zero)."""

    def __init__(self, kind: EmbeddingKind | SlotKind, vocab: int, hidden: int) -> None:
        self.index = torch.zeros(kind.num_slots + 1, vocab, dtype=torch.long, device=kind.device)
        self.delta = kind._empty(1, hidden)  # (slots+1, 1 + N, hidden)
        self.ids = torch.zeros(kind.num_slots + 1, 1, dtype=torch.long, device=kind.device)  # (slots+1, 1 + N)

    def set(self, slot: int, payload: TokenRows | None) -> None:
        n = 0 if payload is None else payload.ids.shape[0]
        if n + 1 > self.delta.shape[1]:
            self.delta = nn.functional.pad(self.delta, (0, 0, 0, n + 1 - self.delta.shape[1]))
            self.ids = nn.functional.pad(self.ids, (0, n + 1 - self.ids.shape[1]))
        self.index[slot].zero_()
        self.delta[slot].zero_()
        self.ids[slot].zero_()
        if payload is not None:
            rows = torch.arange(1, n + 1, device=self.index.device)
            self.index[slot, payload.ids] = rows
            self.delta[slot, 1 : n + 1] = payload.delta
            self.ids[slot, 1 : n + 1] = payload.ids

    def holds(self, slot: int) -> bool:
        return bool(self.ids[slot].any())


class _TokenRowsKind:
    """What the embedding's and the head's token rows share: their tables, installed per slot; a row's state is its
    slots and weights."""

    rows: _RowTables

    def set(self, slot: int, payload: TokenRows | None) -> None:
        self.rows.set(slot, payload)

    def holds(self, slot: int) -> bool:
        return self.rows.holds(slot)

    def gather(self, plan: BatchPlan, used: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _weighted(plan)


@register_kind
class TokenRowsKind(_TokenRowsKind, EmbeddingKind):
    """Trainable tokens on the input embedding: a row's tokens in its adapters' sets get their delta rows."""

    name = "token_rows"

    def __init__(self, base: nn.Module, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.rows = _RowTables(self, *base.weight.shape)

    def apply(self, ids: torch.Tensor, y: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        slots, weights = state
        scale = _embed_scale(self.base)
        for k in range(slots.shape[1]):
            s = slots[:, k, None]  # (Bt, 1)
            d = self.rows.delta[s, self.rows.index[s, ids]]  # (Bt, T, hidden)
            y = y + d * (weights[:, k, None, None].to(self.dtype) * scale)
        return y


@register_kind
class HeadRowsKind(_TokenRowsKind, SlotKind):
    """Trainable tokens on an output head tied to the embedding: the logits of a row's tokens in its adapters' sets
    come from their new rows (h @ delta added to those columns)."""

    name = "head_rows"

    def __init__(self, base: nn.Linear, num_slots: int, dtype: torch.dtype) -> None:
        super().__init__(base, num_slots, dtype)
        self.rows = _RowTables(self, base.out_features, base.in_features)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor, y: torch.Tensor, state: tuple) -> torch.Tensor:
        slots, weights = state
        for k in range(slots.shape[1]):
            s = slots[:, k]
            d = torch.bmm(x, self.rows.delta[s].transpose(1, 2)) * weights[:, k, None, None].to(self.dtype)
            cols = self.rows.ids[s][:, None, :].expand(-1, x.shape[1], -1)  # (Bt, T, 1 + N); padding: column 0, +0
            y = y.scatter_add(-1, cols, d.to(y.dtype))
        return y


_BASE_COPY = ".base_layer.weight"  # PEFT saves the embedding (and head) it wrapped beside their LoRA
_TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"


def read_embedding_parts(
    ref: str, config: LoraConfig, tensors: dict[str, torch.Tensor], base: BaseInfo
) -> dict[str, LinearDelta]:
    """The artifact's deltas on the input embedding and the output head beyond the head's plain LoRA (which the
    linear path reads): per wrapped module, its payloads. Takes the tensors it reads out of ``tensors``."""
    embed_name, embedding = base.embedding
    head = base.linears[base.head] if base.head is not None else None
    if config.modules_to_save:
        names = ", ".join(config.modules_to_save)
        mb = (embedding.weight.numel() * embedding.weight.element_size()) / 2**20
        raise UnsupportedAdapter(
            f"{ref}: modules_to_save ({names}) is not served: a whole copy per adapter ({mb:.1f} MB for the embedding "
            "or head of this base); train LoRA on them (target_modules) or trainable tokens instead"
        )
    for key in [k for k in tensors if k.endswith(_BASE_COPY)]:
        module = key.removesuffix(_BASE_COPY)
        own = {embed_name: embedding, base.head: head}.get(module)
        if own is None:
            continue  # a nested expert wrapper's tensors are not copies: the LoRA path reads them
        copy = tensors.pop(key)
        if copy.shape != own.weight.shape or not torch.equal(copy.float(), own.weight.float()):
            raise ArtifactRejected(f"{ref}: tensor {key} is not the base's {module} weight (this base differs)")
    out: dict[str, LinearDelta] = {}
    a, b = tensors.pop(f"{embed_name}.lora_embedding_A", None), tensors.pop(f"{embed_name}.lora_embedding_B", None)
    if a is not None or b is not None:
        if a is None or b is None:
            raise ArtifactRejected(f"{ref}: {embed_name} needs both lora_embedding_A and lora_embedding_B")
        vocab, hidden = embedding.weight.shape
        r, scaling = rank_and_scaling(ref, config, embed_name)
        check_shape(ref, f"{embed_name}.lora_embedding_A", a, (r, vocab))
        check_shape(ref, f"{embed_name}.lora_embedding_B", b, (hidden, r))
        factors = EmbeddingLoraFactors(a.T.to(base.dtype).contiguous(), (b.T.float() * scaling).to(base.dtype))
        out[embed_name] = LinearDelta({EmbeddingLoraKind.name: factors})
    for key in [k for k in tensors if k.endswith(_TOKEN_ROWS)]:
        if key.removesuffix(_TOKEN_ROWS) != embed_name:
            raise ArtifactRejected(f"{ref}: trainable tokens {key!r} on another module than the input embedding")
        rows = _token_rows(ref, config, tensors.pop(key), embedding)
        out.setdefault(embed_name, LinearDelta({})).parts[TokenRowsKind.name] = rows
        if head is not None and head.weight is embedding.weight:  # tied: the head's rows are the new ones too
            out[base.head] = LinearDelta({HeadRowsKind.name: rows})  # type: ignore[index]
    return out


def _token_rows(ref: str, config: LoraConfig, values: torch.Tensor, embedding: nn.Module) -> TokenRows:
    """PEFT's trainable tokens: new values for the rows ``trainable_token_indices`` names, as deltas from the base's."""
    indices = config.trainable_token_indices
    if isinstance(indices, dict):
        if len(indices) != 1:
            raise ArtifactRejected(f"{ref}: trainable tokens on several modules ({', '.join(indices)}) are not served")
        (indices,) = indices.values()
    vocab, hidden = embedding.weight.shape
    if not indices or len(set(indices)) != len(indices) or not all(isinstance(i, int) for i in indices):
        raise ArtifactRejected(f"{ref}: trainable_token_indices must be distinct token ids, got {indices!r}")
    if past := [i for i in indices if not 0 <= i < vocab]:
        raise ArtifactRejected(
            f"{ref}: trainable token {past[0]} is outside the base's vocabulary of {vocab} (tokens added to the "
            "vocabulary need a base with them)"
        )
    check_shape(ref, f"trainable tokens of {len(indices)} rows", values, (len(indices), hidden))
    ids = torch.tensor(indices, dtype=torch.long)
    return TokenRows(ids, (values.float() - embedding.weight[ids].float()).to(embedding.weight.dtype))
