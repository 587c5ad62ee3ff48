"""The training objective and evaluation, one definition for the trainer, the benchmark and the tests.

A batch is what :func:`collate` makes of examples: right-padded ``input_ids`` and ``attention_mask``, and
``labels`` holding the id of every scored token (a completion token past the first position, unless the
example says it is not scored) and
:data:`IGNORE` elsewhere (prompt, padding), transformers' convention. The loss is the cross-entropy of each
scored token given the tokens before it, computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.nn import functional as F

from hotswap.train.data import Dataset, Example

IGNORE = -100  # the label of a position that is not scored (transformers' ignore index)
Batch = Mapping[str, torch.Tensor]


def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels``, each (B, T), right-padded to the longest example."""
    seqs = [ex.prompt + ex.completion for ex in examples]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)  # (B, T)
    for i, (ex, seq) in enumerate(zip(examples, seqs, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        first = max(len(ex.prompt), 1)  # the first token has no context to be predicted from
        labels[i, first : len(seq)] = ids[i, first : len(seq)]
        if ex.scored is not None:  # e.g. the user turns between a conversation's assistant turns
            context = torch.tensor([not s for s in ex.scored])  # (len(completion),)
            labels[i, len(ex.prompt) : len(seq)][context] = IGNORE
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def to_device(batch: Batch, device: str | torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _predictions(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting each next token (B, T-1, V), the next tokens' labels (B, T-1), which are scored)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, -ids.shape[1] :]  # (B, T, V)
    gold = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1; virtual tokens dropped above
    return logits[:, :-1], gold, gold != IGNORE


def token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of every scored token of ``batch`` (n_scored,), float32."""
    pred, gold, scored = _predictions(model, batch)
    return F.cross_entropy(pred[scored].float(), gold[scored], reduction="none")


@torch.no_grad()
def eval_sums(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, device: str | torch.device
) -> torch.Tensor:
    """[sum of token losses, scored tokens, examples whose every scored token is the greedy (teacher-forced) one,
    examples] over ``examples`` (4,), float64 on ``device``: sums add up across data-parallel shards."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        pred, gold, scored = _predictions(model, to_device(collate(chunk), device))
        losses = F.cross_entropy(pred[scored].float(), gold[scored], reduction="sum")
        wrong = ((pred.argmax(-1) != gold) & scored).any(dim=1)  # (B,)
        found = [losses.item(), scored.sum().item(), (~wrong).sum().item(), len(chunk)]
        sums += torch.tensor(found, dtype=torch.float64, device=device)
    model.train(was_training)
    return sums


def means(sums: torch.Tensor) -> tuple[float, float]:
    """(mean token loss, exact-match accuracy) from :func:`eval_sums`."""
    loss_sum, tokens, exact, count = sums.tolist()
    return loss_sum / max(tokens, 1), exact / max(count, 1)


def evaluate(model: torch.nn.Module, ds: Dataset, batch_size: int, device: str | torch.device) -> tuple[float, float]:
    """(mean token loss, exact-match accuracy) over ``ds``."""
    return means(eval_sums(model, ds.examples, batch_size, device))
