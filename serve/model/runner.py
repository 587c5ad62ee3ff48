"""The model forward the engine runs: the base's own HF modeling code, with hotswap's attention and KV cache.

Any decoder-only causal LM whose HF class supports transformers' attention interface runs here (Llama,
Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, Granite, …): the model is called as HF would call it, with
per-row ``position_ids`` and ``logits_to_keep``, and :mod:`hotswap.serve.model.attention` keeps each row's keys and
values. A model that cannot work this way is refused at load by :func:`check_supported`, with its model type.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from hotswap.basemodel import check_supported, head_dim
from hotswap.errors import InvalidBaseModel
from hotswap.serve.model.attention import ATTENTION, model_logits
from hotswap.serve.model.graphs import StaticDecode
from hotswap.serve.model.kvcache import PagedCache, StaticCache


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a model's keys and values."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim(config)


class Runner:
    """Batched forward of one causal LM over a KV cache of ``max_batch`` rows of up to ``max_seq_len`` positions:
    ``block_size`` > 0 pages it in ``num_blocks`` blocks of that many positions, else every row owns its positions."""

    def __init__(
        self,
        model: nn.Module,
        max_batch: int,
        max_seq_len: int,
        block_size: int = 0,
        num_blocks: int = 0,
        decode: str = "eager",
    ) -> None:
        check_supported(model)
        model.set_attn_implementation(ATTENTION)
        self.model = model
        self.embed = model.get_input_embeddings()
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        w = self.embed.weight
        layers, kv_heads, hd = kv_shape(model.config)
        self.cache: StaticCache | PagedCache
        if block_size:
            self.cache = PagedCache(layers, max_batch, num_blocks, block_size, kv_heads, hd, w.dtype, w.device)
        else:
            self.cache = StaticCache(layers, max_batch, kv_heads, max_seq_len, hd, w.dtype, w.device)
        self._probe()
        # the static decode (serve.model.graphs) of full batches
        self.static = None if decode == "eager" else StaticDecode(model, self.cache, max_batch, max_seq_len, decode)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def embed_rows(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Input embeddings (L_i, hidden) of each row's ``ids[i]``, the rows as the batch plan has them (so that each
        sees its adapters' embedding deltas)."""
        width = max(len(row) for row in ids)
        padded = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        embeds = self.embed(padded.to(self.device))
        return [embeds[i, : len(row)] for i, row in enumerate(ids)]

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """Input embeddings of ``ids`` (L, hidden)."""
        return self.embed(torch.tensor(ids, device=self.device))

    def release(self, row: int, end: int) -> None:
        """Zero cache row ``row`` up to position ``end``."""
        self.cache.release(row, end)

    def prefill(
        self, rows: list[int], embeds: list[torch.Tensor], starts: list[int], all_positions: bool = False
    ) -> list[torch.Tensor]:
        """Run each row's ``embeds`` (L_i, hidden) at cache positions ``starts[i]`` onwards of cache row ``rows[i]``.

        Rows are left-padded to one length (padding writes only scratch space), so every row's last
        token is the batch's last column. Returns float logits per row: (V,) at its last token, or (L_i, V) with
        ``all_positions``."""
        lengths = [e.shape[0] for e in embeds]
        width, dev = max(lengths), self.device
        hidden = torch.zeros(len(embeds), width, embeds[0].shape[-1], dtype=embeds[0].dtype, device=dev)
        positions = torch.full((len(embeds), width), -1, dtype=torch.long)
        for i, (e, n, start) in enumerate(zip(embeds, lengths, starts, strict=True)):
            hidden[i, width - n :] = e
            positions[i, width - n :] = torch.arange(start, start + n)
        logits = self.forward(rows, hidden, positions, keep=0 if all_positions else 1)
        if all_positions:
            return [logits[i, width - n :] for i, n in enumerate(lengths)]
        return list(logits[:, -1])

    def decode_rows(self, n: int) -> int:
        """Rows a full batch of ``n`` decodes: ``n``, or its batch bucket under the static decode (the rows beyond
        ``n`` are fed as idle rows)."""
        return n if self.static is None else self.static.rows(n)

    def decode(self, rows: list[int], tokens: torch.Tensor, positions: torch.Tensor, contiguous: bool) -> torch.Tensor:
        """One token per row: ``tokens`` (n,) at ``positions`` (n,; -1 for an idle row) of cache ``rows`` (n,)
        (host tensors). ``contiguous``: rows are [0, n), n from :meth:`decode_rows`. Returns float logits (n, V)."""
        if contiguous and self.static is not None:
            logits = self.static.decode(tokens, positions)
            if logits is not None:
                return logits
        embeds = self.embed(tokens.to(self.device)[:, None])  # (n, 1, hidden)
        return self.forward(rows, embeds, positions[:, None], keep=1, contiguous=contiguous)[:, 0]

    def forward(
        self, rows: list[int], embeds: torch.Tensor, positions: torch.Tensor, keep: int, contiguous: bool = False
    ) -> torch.Tensor:
        """The model on ``embeds`` (B, T, hidden) for cache ``rows`` (B,) at ``positions`` (B, T; -1 = padding):
        float logits (B, keep or T, V) of the last ``keep`` tokens (0 = all), post-processed as the family does."""
        positions = positions.to(self.device)
        return model_logits(self.model, embeds, positions, self.cache.bind(rows, positions, contiguous), keep)

    @torch.inference_mode()
    def _probe(self) -> None:
        """One token through the whole path at load: a family whose attention needs what ours lacks (sinks, its
        own masks) fails here, refused with its model type, rather than on a request."""
        try:  # position -1: a padding token, which writes only scratch space
            self.forward([0], self.embed_ids([0])[None], torch.full((1, 1), -1), keep=1, contiguous=True)
        except InvalidBaseModel as e:
            raise InvalidBaseModel(f"model type {self.model.config.model_type!r}: {e}") from e
