"""The model forward the engine runs: the base's own HF modules, our KV cache and attention masks.

Why not ``model(...)``: continuous batching needs every row to have its own length and write
position (rows join and leave between steps, prefix-tuning rows start with learned keys/values), and
HF's caches share one write position per batch. So the decoder loop lives here (as in nanoGPT or
gpt-fast), calling the HF layers' own norms, projections (our wrapped multi-adapter linears), rotary
embedding and MLPs; only the cache and mask are ours. Position id == cache index for every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hotswap.errors import InvalidBaseModel

# Architectures whose decoder block is Llama's (pre-norm, q/k/v/o + gated MLP, rotary, no sliding window).
SUPPORTED_MODEL_TYPES = ("llama",)


def head_dim(config: object) -> int:
    """Size of one attention head: the config's ``head_dim`` where it has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # type: ignore[attr-defined]


class Runner:
    """Batched forward with a static per-row KV cache: (layers, max_batch, kv_heads, max_seq_len, head_dim)."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq_len: int) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidBaseModel(
                f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.lm_head = model.lm_head
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        w = self.embed.weight
        shape = (len(self.layers), max_batch, self.num_kv_heads, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @torch.inference_mode()  # a runner made inside the engine's loop holds inference tensors
    def clear_row(self, row: int, end: int) -> None:
        """Zero cache positions [0, end) of ``row`` (a finished row's keys/values never reach the next one)."""
        self.k_cache[:, row, :, :end] = 0
        self.v_cache[:, row, :, :end] = 0

    def write_prefix(self, row: int, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a prefix-tuning adapter's keys/values at cache positions [0, P) of ``row``."""
        for i, (k, v) in enumerate(prefix_kv):  # each (kv_heads, P, head_dim)
            p = k.shape[1]
            self.k_cache[i, row, :, :p] = k
            self.v_cache[i, row, :, :p] = v

    def forward(
        self, rows: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, contiguous: bool = False
    ) -> torch.Tensor:
        """Run the decoder on ``embeds`` (Bt, T, hidden) for cache ``rows`` (Bt,) at ``positions`` (Bt, T).

        Each token's keys/values are written at its position; it attends to every cache position <= its own
        in its row (so a row sees its prefix, its prompt and what it generated, never another row).
        ``contiguous`` says rows == arange(Bt), letting attention read the cache without a copy.
        Returns the final hidden states (Bt, T, hidden), normalised.
        """
        bt, t = positions.shape
        key_len = int(positions.max()) + 1
        mask = torch.arange(key_len, device=positions.device)[None, None, :] <= positions[:, :, None]  # (Bt, T, L)
        mask = mask[:, None]  # (Bt, 1, T, L)
        h = embeds
        cos, sin = self.rotary(h, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(bt, t, -1, self.head_dim).transpose(1, 2)  # (Bt, H, T, hd)
            k = attn.k_proj(x).view(bt, t, -1, self.head_dim).transpose(1, 2)  # (Bt, KV, T, hd)
            v = attn.v_proj(x).view(bt, t, -1, self.head_dim).transpose(1, 2)  # (Bt, KV, T, hd)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k_cache[i][rows[:, None], :, positions] = k.transpose(1, 2)  # (Bt, T, KV, hd) at (row, pos)
            self.v_cache[i][rows[:, None], :, positions] = v.transpose(1, 2)
            if contiguous:
                keys, values = self.k_cache[i, :bt, :, :key_len], self.v_cache[i, :bt, :, :key_len]
            else:
                keys, values = self.k_cache[i, rows, :, :key_len], self.v_cache[i, rows, :, :key_len]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            h = residual + attn.o_proj(o.transpose(1, 2).reshape(bt, t, -1))  # (Bt, T, hidden)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
