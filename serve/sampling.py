"""Next-token choice per row: greedy rows in one argmax; sampled rows with their own seeded generator,
so a request's samples depend on its seed and its own logits only, never on its batch neighbours."""

from __future__ import annotations

import torch


class RowSampler:
    """Sampling parameters and RNG state of one request."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator: torch.Generator | None = None
        if temperature > 0:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample(self, logits: torch.Tensor) -> int:
        """logits: (V,) float32 on CPU -> one token id (temperature, then top-k, then top-p)."""
        scores = logits / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_scores, -1) >= self.top_p  # keep the smallest set reaching top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """logits: (Bt, V) -> next token per row."""
    out = logits.argmax(-1).tolist()  # greedy rows, all at once
    if any(not s.greedy for s in samplers):
        cpu = logits.float().cpu()
        for i, s in enumerate(samplers):
            if not s.greedy:
                out[i] = s.sample(cpu[i])
    return out
