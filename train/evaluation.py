"""Evaluate adapters and the base on held-out data through the serving engine, and promote on the result.

    scores = evaluate_refs("bases/smollm2", ["-", "extract:prod", "extract@2"], "eval.jsonl", registry=reg)

Every ref's rows run through ONE engine, mixed in its batches as the server mixes them, so what is measured is
what is served. Per ref:

- **eval loss**: the mean cross-entropy of the scored tokens given what precedes them (teacher-forced; the
  training objective's definition, ``hotswap.train.loss``);
- **exact match**: the share of examples whose greedy answer equals the expected one token for token and ends
  where it ends (at the eos that closes it, e.g. ``<|im_end|>``). An example's question and answer are its
  context and last scored run (:attr:`Example.answer`): a conversation's last assistant turn;
- a few sample answers beside the expected ones.

:func:`promote_if_better` moves an alias to a version only when the version scores better than the alias's
current target (exact match first, then eval loss), and records both scores with the move in the adapter's
alias history (published manifests never change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.registry.refs import LATEST, check_alias, check_part
from hotswap.serve import Engine, FinishReason, Request, Result
from hotswap.train.data import Dataset, Example, load_data, text_codec
from hotswap.train.loss import IGNORE, collate

BASE = "-"  # the base model alone, as a ref
EVAL_SIZE = 128  # examples drawn for a built-in task
EVAL_SEED = 10_000  # the draw's seed: train's held-out draw for seed 0


@dataclass(frozen=True)
class Score:
    ref: str  # as given ("-": the base)
    resolved: str  # the exact version ("name@3"), or "base"
    eval_loss: float
    exact_match: float  # share of examples, 0..1
    exact: int  # examples answered exactly
    examples: int
    answers: list[str]  # the first greedy answers, as text (token ids where the base has no tokenizer)

    def beats(self, other: Score) -> bool:
        """More exact answers, or as many and a lower eval loss."""
        if self.exact_match != other.exact_match:
            return self.exact_match > other.exact_match
        return self.eval_loss < other.eval_loss

    def summary(self) -> str:
        return f"{self.resolved}: exact {self.exact}/{self.examples}, loss {self.eval_loss:.4f}"


@dataclass(frozen=True)
class Evaluation:
    data: str  # where the examples came from
    digest: str  # sha256 of their ids, as training records it
    expected: list[str]  # the first expected answers
    scores: list[Score]  # in the order of the refs


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _adapters(ref: str) -> list[str]:
    return [] if ref == BASE else [ref]


def _row_loss(logits: torch.Tensor, ex: Example) -> tuple[float, int]:
    """(sum of the scored tokens' cross-entropy, how many) for one row's logits over its whole sequence (L, V)."""
    gold = collate([ex])["labels"][0, 1:]  # (L-1,): position t predicts token t+1
    scored = gold != IGNORE
    losses = F.cross_entropy(logits[:-1][scored].float(), gold[scored].to(logits.device), reduction="sum")
    return losses.item(), int(scored.sum())


def _expected(ex: Example, eos_ids: set[int]) -> tuple[list[int], list[int], bool]:
    """(question ids, answer ids without a closing eos, whether the answer closes with one)."""
    question, answer = ex.answer
    closes = bool(answer) and answer[-1] in eos_ids
    return question, answer[:-1] if closes else answer, closes


def evaluate_refs(
    base: str | Path,
    refs: Sequence[str],
    data: str,
    *,
    registry: Registry | str | Path | None = None,
    samples: int = 3,
    max_batch: int = 16,
    device: str = "cpu",
    dtype: str = "auto",
) -> Evaluation:
    """Score each of ``refs`` ("-" for the base) on ``data`` (a JSONL file or ``builtin:TASK``)."""
    if not refs:
        raise InvalidArgument("give at least one ref to evaluate ('-' is the base)")
    if len(set(refs)) != len(refs):
        raise InvalidArgument(f"refs must differ: {', '.join(refs)}")
    if samples < 0:
        raise InvalidArgument(f"samples must be >= 0, got {samples}")
    with Engine(base, registry, max_batch=max_batch, device=device, dtype=dtype) as engine:
        codec = text_codec(engine.tokenizer, engine.model.config)
        ds = load_data(data, codec, size=EVAL_SIZE, seed=EVAL_SEED)
        # resolved once: every row of a ref runs the same version, even if its alias moves meanwhile
        exact_refs = [
            BASE if ref == BASE else engine.registry.resolve(ref, base_fingerprint=engine.base_fingerprint).ref
            for ref in refs
        ]
        expected = [_expected(ex, engine.eos_ids) for ex in ds.examples]
        losses = _losses(engine, exact_refs, ds)
        answers = _answers(engine, exact_refs, expected)
        decode = (lambda ids: engine.tokenizer.decode(ids)) if engine.tokenizer is not None else str
        n = len(ds.examples)
        scores = []
        for i, ref in enumerate(refs):
            exact = sum(
                (r.token_ids, r.finish_reason == FinishReason.STOP) == (answer, closes)
                for r, (_, answer, closes) in zip(answers[i], expected, strict=True)
            )
            loss_sum, tokens = losses[i]
            shown_answers = [r.text if r.text is not None else str(r.token_ids) for r in answers[i][:samples]]
            resolved = "base" if ref == BASE else exact_refs[i]
            scores.append(Score(ref, resolved, loss_sum / max(tokens, 1), exact / n, exact, n, shown_answers))
        shown = [decode(answer) for _, answer, _ in expected[:samples]]
    return Evaluation(data, ds.digest, shown, scores)


def _losses(engine: Engine, refs: Sequence[str], ds: Dataset) -> list[tuple[float, int]]:
    """Per ref (sum of scored-token losses, scored tokens), every (ref, example) row in mixed batches."""
    rows = [(i, ex) for ex in ds.examples for i in range(len(refs))]  # each batch mixes the refs
    sums = [[0.0, 0] for _ in refs]
    for chunk in _chunks(rows, engine.config.max_batch):
        requests = [
            Request(prompt_ids=ex.prompt + ex.completion, adapters=_adapters(refs[i]), max_new_tokens=1)
            for i, ex in chunk
        ]
        for (i, ex), logits in zip(chunk, engine.forward_logits(requests), strict=True):
            loss, tokens = _row_loss(logits, ex)
            sums[i][0] += loss
            sums[i][1] += tokens
    return [(loss, int(tokens)) for loss, tokens in sums]


def _answers(
    engine: Engine, refs: Sequence[str], expected: list[tuple[list[int], list[int], bool]]
) -> list[list[Result]]:
    """Per ref, per example: the greedy answer, generated with room for the expected answer and its eos, submitted
    in waves that fit the engine's queue (continuous batching mixes the refs)."""
    requests = [
        Request(prompt_ids=question, adapters=_adapters(ref), max_new_tokens=len(answer) + closes)
        for ref in refs
        for question, answer, closes in expected
    ]
    results = []
    for wave in _chunks(requests, engine.config.max_queue):
        results += engine.generate(wave)
    return _chunks(results, len(expected))


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    name: str
    alias: str
    version: int
    previous: int | None  # the alias's version before (None: it was unset)
    candidate: Score
    incumbent: Score
    record: dict[str, Any]  # what the alias history keeps


def promote_if_better(
    registry: Registry,
    name: str,
    alias: str,
    version: int,
    against: str,
    base: str | Path,
    data: str,
    **engine: Any,
) -> Promotion:
    """Point ``name:alias`` at ``version`` only if it beats ``against`` on ``data``: an alias of ``name`` (an
    unset one is the base: a first promotion must beat the base model), another ref, or "-" (the base). Both run
    in one engine; the comparison is recorded with the move."""
    check_alias(alias)  # before the evaluation, which takes a while
    candidate_ref = f"{name}@{version}"
    registry.resolve(candidate_ref)  # it exists
    if against == BASE:
        incumbent_ref = BASE
    elif "@" in against or ":" in against:
        incumbent_ref = registry.resolve(against).ref
    else:
        check_part(against, "alias")
        is_set = against == LATEST or against in registry.aliases(name)
        incumbent_ref = registry.resolve(f"{name}:{against}").ref if is_set else BASE
    if incumbent_ref == candidate_ref:
        raise InvalidArgument(f"{candidate_ref} is {against} already; nothing to compare it with")
    result = evaluate_refs(base, [candidate_ref, incumbent_ref], data, registry=registry, **engine)
    candidate, incumbent = result.scores
    promoted = candidate.beats(incumbent)
    verb = "beats" if promoted else "does not beat"
    record = {
        "summary": f"{candidate.summary()} {verb} {incumbent.summary()}",
        "gate": {"data": data, "digest": result.digest, "metric": "exact_match, then eval_loss"},
        "candidate": _recorded(candidate),
        "incumbent": _recorded(incumbent),
    }
    previous = registry.aliases(name).get(alias)
    if promoted:
        registry.set_alias(name, alias, version, record=record)
    return Promotion(promoted, name, alias, version, previous, candidate, incumbent, record)


def _recorded(score: Score) -> dict[str, Any]:
    out = asdict(score)
    del out["answers"]
    if not math.isfinite(out["eval_loss"]):
        out["eval_loss"] = None  # JSON has no inf
    return out
