"""hotswap's attention function, plugged into transformers' attention interface.

The base runs its own HF modeling code (norms, projections — our wrapped multi-adapter linears —, rotary
embedding, MLPs, logit post-processing) for every family; only attention is ours, registered as
``ATTENTION`` with :class:`transformers.AttentionInterface` (with a mask function that builds nothing),
as vLLM's Transformers backend does. Why: continuous batching needs each row to keep its own KV cache row
and write position (rows join and leave between steps, prefix-tuning rows start with learned keys/values),
while HF's caches share one write position per batch.

Each layer's attention gets its post-rotary query/key/value; :func:`hotswap_attention` writes the keys and
values into the :class:`KVCache` at each token's cache index and attends over that row's cache only, with a
causal mask (and the layer's sliding window, and logit soft-capping where the family has them). What one
forward attends over travels in a :class:`Batch` set by :func:`attending` around the model call, so it
reaches every family whatever its forward passes down. :func:`attention_ref` is the plain per-row loop the
fast path is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hotswap.errors import InvalidBaseModel

ATTENTION = "hotswap"
# Attention features some families pass that this function does not implement (attention sinks): a model
# passing one is refused at load (see serve.runner.check_supported), never answered wrongly.
UNSUPPORTED_KWARGS = ("s_aux", "sinks")


class KVCache:
    """Keys and values per layer, cache row and position: (layers, rows, kv_heads, max_seq_len + 1, head_dim).

    The extra last position is scratch: padding tokens write there and nothing ever reads it."""

    def __init__(
        self, layers: int, rows: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        shape = (layers, rows, kv_heads, max_seq_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch = max_seq_len

    @torch.inference_mode()  # a cache made inside the engine's loop holds inference tensors
    def clear_row(self, row: int, end: int) -> None:
        """Zero positions [0, end) of ``row`` (a finished row's keys/values never reach the next one)."""
        self.k[:, row, :, :end] = 0
        self.v[:, row, :, :end] = 0

    def write_prefix(self, row: int, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a prefix-tuning adapter's keys/values at positions [0, P) of ``row``."""
        for i, (k, v) in enumerate(prefix_kv):  # each (kv_heads, P, head_dim)
            p = k.shape[1]
            self.k[i, row, :, :p] = k
            self.v[i, row, :, :p] = v


@dataclass
class Batch:
    """What one forward attends over: token (b, t) sits at ``positions[b, t]`` of cache row ``rows[b]``
    (or is padding: ``positions`` -1, written to the scratch position, attending to position 0 only).

    ``contiguous``: rows == arange(B), so attention reads the cache without a gather."""

    cache: KVCache
    rows: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B, T), -1 for padding
    contiguous: bool = False
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.key_len = int(self.positions.max()) + 1
        self.index = torch.where(self.positions >= 0, self.positions, self.cache.scratch)  # (B, T) write index

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, T, key_len) bool: key position k is visible to a query at q iff k <= q (and q - k < window)."""
        if window not in self._masks:
            q = self.positions.clamp(min=0)[:, None, :, None]  # (B, 1, T, 1)
            k = torch.arange(self.key_len, device=q.device)  # (L,)
            visible = k <= q
            if window is not None:
                visible &= q - k < window
            self._masks[window] = visible
        return self._masks[window]


_batch: ContextVar[Batch | None] = ContextVar("hotswap_attention_batch", default=None)


@contextlib.contextmanager
def attending(batch: Batch) -> Iterator[None]:
    """Run a model forward inside this block to attend over ``batch``."""
    token = _batch.set(batch)
    try:
        yield
    finally:
        _batch.reset(token)


def hotswap_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, T, hd), key/value (B, KV, T, hd) after rotary; returns
    (B, T, H, hd). Writes key/value into the cache, then attends over each row's cache."""
    batch = _batch.get()
    if batch is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only inside serve.attention.attending()")
    unsupported = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if unsupported or attention_mask is not None:
        raise InvalidBaseModel(f"this model's attention needs {unsupported or ['its own mask']}, which hotswap lacks")
    cache, layer = batch.cache, module.layer_idx
    cache.k[layer][batch.rows[:, None], :, batch.index] = key.transpose(1, 2).to(cache.k.dtype)  # (B, T, KV, hd)
    cache.v[layer][batch.rows[:, None], :, batch.index] = value.transpose(1, 2).to(cache.v.dtype)
    n, length = query.shape[0], batch.key_len
    if batch.contiguous:
        keys, values = cache.k[layer, :n, :, :length], cache.v[layer, :n, :, :length]
    else:
        keys, values = cache.k[layer, batch.rows, :, :length], cache.v[layer, batch.rows, :, :length]
    mask = batch.mask(sliding_window)
    if softcap is None:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    else:  # SDPA has no logit soft-capping (Gemma 2): the same computation spelled out
        groups = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scores = torch.tanh(query @ keys.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5) / softcap) * softcap
        out = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(values.dtype) @ values
    return out.transpose(1, 2), None


def attention_ref(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    query: torch.Tensor,
    positions: list[int],
    scaling: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference for one row and one layer, a loop over its tokens: cache_k/cache_v (KV, L, hd) already hold
    the row's keys/values, query (H, T, hd) at ``positions``; returns (T, H, hd)."""
    groups = query.shape[0] // cache_k.shape[0]
    out = []
    for t, q_pos in enumerate(positions):
        lo = 0 if window is None else max(0, q_pos - window + 1)
        k = cache_k[:, lo : q_pos + 1].repeat_interleave(groups, 0)  # (H, n, hd)
        v = cache_v[:, lo : q_pos + 1].repeat_interleave(groups, 0)
        scores = (k.float() @ query[:, t, :, None].float())[..., 0] * scaling  # (H, n)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out.append((scores.softmax(-1)[:, None, :] @ v.float())[:, 0])  # (H, hd)
    return torch.stack(out).to(query.dtype)


def _no_mask(*args: object, **kwargs: object) -> None:
    """Masks live in :class:`Batch`; the model builds none."""
    return None


AttentionInterface.register(ATTENTION, hotswap_attention)
AttentionMaskInterface.register(ATTENTION, _no_mask)
