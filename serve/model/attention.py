"""hotswap's attention function, plugged into transformers' attention interface.

The base runs its own HF modeling code (norms, projections — our wrapped multi-adapter linears —, rotary
embedding, MLPs, logit post-processing) for every family; only attention is ours, registered as
``ATTENTION`` with :class:`transformers.AttentionInterface` (with a mask function that builds nothing),
as vLLM's Transformers backend does. Why: continuous batching needs each row to keep its own KV cache row
and write position (rows join and leave between steps, rows of a context adapter may start with written keys/values),
while HF's caches share one write position per batch.

Each layer's attention gets its post-rotary query/key/value; :func:`hotswap_attention` writes the keys and
values into the :class:`KVCache` at each token's cache index and attends over that row's cache only, with a
causal mask (and the layer's sliding window, logit soft-capping and gpt-oss's attention sinks where the family has
them); the cache is static or paged (:mod:`hotswap.serve.model.kvcache`). What one forward attends over travels in a
:class:`~hotswap.serve.model.kvcache.Batch` passed to the model call as the keyword ``hotswap_batch``, which
transformers hands down to the attention function (a plain argument, so a traced or captured step sees it; a
family that drops it is refused at load). :func:`attention_ref` is the plain per-row loop the fast path is tested
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hotswap.errors import InvalidBaseModel
from hotswap.serve.model.kvcache import Batch

ATTENTION = "hotswap"
# Attention features some families pass that this function does not implement (per-token sinks computed from the
# hidden states, Inkling 2's ``sinks``; gpt-oss's learned per-head ``s_aux`` is implemented): a model passing one is
# refused at load (see Runner._probe), never answered wrongly.
UNSUPPORTED_KWARGS = ("sinks",)

BATCH_KWARG = "hotswap_batch"  # the model call's keyword carrying the Batch


def model_logits(
    model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, batch: Batch, keep: int
) -> torch.Tensor:
    """The causal LM on ``embeds`` (B, T, hidden) at cache ``positions`` (B, T; -1 = padding) attending over
    ``batch``: float logits (B, keep or T, V) of the last ``keep`` tokens (0 = all), post-processed as the family
    does. Tensor ops only, so the static decode traces or captures it."""
    out = model(
        inputs_embeds=embeds,
        position_ids=positions.clamp(min=0),
        logits_to_keep=keep,
        use_cache=False,
        **{BATCH_KWARG: batch},
    )
    return out.logits.float()


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
    (B, T, H, hd). Writes key/value into the cache, then attends over each row's cache. ``s_aux`` (H,): gpt-oss's
    learned sink logit per head, one more softmax column (after scaling and masking, never windowed) whose
    probability is dropped, as its eager attention does."""
    batch = kwargs.pop(BATCH_KWARG, None)
    if not isinstance(batch, Batch):
        raise InvalidBaseModel(f"this model's forward does not pass {BATCH_KWARG!r} down to its attention")
    unsupported = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    s_aux = kwargs.get("s_aux")
    sinks = s_aux if isinstance(s_aux, torch.Tensor) else None
    if s_aux is not None and (sinks is None or sinks.shape != query.shape[1:2]):
        unsupported.append("s_aux other than one logit per head")
    if unsupported or attention_mask is not None:
        raise InvalidBaseModel(f"this model's attention needs {unsupported or ['its own mask']}, which hotswap lacks")
    batch.write(module.layer_idx, key, value)
    keys, values = batch.read(module.layer_idx)
    scaling = scaling or query.shape[-1] ** -0.5
    # SDPA has no sink column (and its fused kernels keep their log-sum-exp private): sinks take the matmul path
    if softcap is None and sinks is None and _sdpa_is_faster(query):
        mask = batch.mask(sliding_window)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None
    return _grouped_attention(query, keys, values, batch, sliding_window, scaling, softcap, sinks), None


def _sdpa_is_faster(query: torch.Tensor) -> bool:
    """SDPA's fused kernels win on CUDA and for float32 prefill on a CPU. On a CPU they are slow for one query per
    row and in half precision (measured on AVX-512: 2x slower in float32 decode, 3-6x in bfloat16)."""
    return query.device.type != "cpu" or (query.dtype == torch.float32 and query.shape[2] > 1)


def _grouped_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    batch: Batch,
    window: int | None,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA's result (with Gemma 2's logit soft-capping and gpt-oss's sinks where given) as two batched matmuls over
    each kv head's group of query heads, softmax in float32: query (B, H, T, hd), keys/values (B, KV, L, hd), sinks
    (H,); returns (B, T, H, hd).

    The matmuls batch over (KV, B) when the cache stores kv heads outermost (the paged cache's gather) and over
    (B, KV) otherwise (the static cache's rows), so that keys and values are read where they lie, never copied; the
    mask is the batch's additive bias, fused into the scores' matmul when there is no soft-capping."""
    b, h, t, d = query.shape
    kv, length = keys.shape[1], keys.shape[2]
    g = h // kv  # query head i uses kv head i // g, as HF's repeat_kv
    kv_major = keys.stride(0) < keys.stride(1)
    q = query.reshape(b, kv, g * t, d)
    if kv_major:
        q, keys, values = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
    q, k, v = q.reshape(-1, g * t, d), keys.reshape(-1, length, d), values.reshape(-1, length, d)  # (N, ., hd)
    bias = batch.bias(window, query.dtype, (kv, g), kv_major)  # (N, G*T, L)
    if softcap is None:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling).float()
    else:
        scores = torch.tanh((q @ k.transpose(1, 2)).float() * (scaling / softcap)) * softcap + bias
    if sinks is not None:  # the sink's column joins the softmax, then leaves: its probability attends to nothing
        order = (kv, b, g, t) if kv_major else (b, kv, g, t)
        per_head = sinks.float().view(kv, 1, g, 1) if kv_major else sinks.float().view(1, kv, g, 1)
        sink = per_head.expand(order).reshape(-1, g * t, 1)
        probs = torch.cat([scores, sink], -1).softmax(-1)[..., :length]
    else:
        probs = scores.softmax(-1)
    out = torch.bmm(probs.to(v.dtype), v)  # (N, G*T, hd)
    if kv_major:
        return out.view(kv, b, g, t, d).permute(1, 3, 0, 2, 4).reshape(b, t, h, d)
    return out.view(b, kv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d)


def attention_ref(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    query: torch.Tensor,
    positions: list[int],
    scaling: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for one row and one layer, a loop over its tokens: cache_k/cache_v (KV, L, hd) already hold
    the row's keys/values, query (H, T, hd) at ``positions``, ``sinks`` (H,) a sink logit per head; returns
    (T, H, hd)."""
    groups = query.shape[0] // cache_k.shape[0]
    out = []
    for t, q_pos in enumerate(positions):
        lo = 0 if window is None else max(0, q_pos - window + 1)
        k = cache_k[:, lo : q_pos + 1].repeat_interleave(groups, 0)  # (H, n, hd)
        v = cache_v[:, lo : q_pos + 1].repeat_interleave(groups, 0)
        scores = (k.float() @ query[:, t, :, None].float())[..., 0] * scaling  # (H, n)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if sinks is not None:  # whatever the window, each query sees its head's sink
            scores = torch.cat([scores, sinks.float()[:, None]], -1)  # (H, n + 1)
        probs = scores.softmax(-1)[:, : v.shape[1]]  # (H, n)
        out.append((probs[:, None, :] @ v.float())[:, 0])  # (H, hd)
    return torch.stack(out).to(query.dtype)


def _no_mask(*args: object, **kwargs: object) -> None:
    """Masks live in :class:`Batch`; the model builds none."""
    return None


AttentionInterface.register(ATTENTION, hotswap_attention)
AttentionMaskInterface.register(ATTENTION, _no_mask)
