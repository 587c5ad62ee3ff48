"""Next-token choice per row: greedy rows in one argmax; sampled rows with their own seeded generator,
so a request's samples depend on its seed and its own logits only, never on its batch neighbours.
A row whose logits are not all finite gets no token (None): the engine ends that row alone."""

from __future__ import annotations

import torch

from hotswap.serve.engine.types import GREEDY_BELOW


class RowSampler:
    """Sampling parameters and RNG state of one request."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def sample(self, logits: torch.Tensor) -> int:
        """logits: (V,) finite, on CPU -> one token id (temperature, then top-k, then top-p)."""
        scores = logits.double() / self.temperature  # float64: a small temperature cannot overflow finite logits
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


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int | None]:
    """logits: (Bt, V) -> next token per row; None for a row whose logits hold a NaN or an infinity."""
    finite = torch.isfinite(logits).all(-1).tolist()  # (Bt,)
    out: list[int | None] = logits.argmax(-1).tolist()  # greedy rows, all at once
    if any(not s.greedy for s in samplers):
        cpu = logits.float().cpu()
        for i, s in enumerate(samplers):
            if not s.greedy and finite[i]:
                out[i] = s.sample(cpu[i])
    return [token if ok else None for token, ok in zip(out, finite, strict=True)]
