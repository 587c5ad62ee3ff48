"""The model step, as small free functions (gpt-fast's ``prefill`` / ``decode_one_token``): each sets the batch
plan (which adapter slots, at which weights and rank, every row uses), runs the base forward over the jobs'
cache rows (with the rows' context kinds applied), adds the logit kinds' offsets, and returns next-token logits
per job. Engine thread, step lock held.
"""

from __future__ import annotations

import torch

from hotswap.methods.api import BatchPlan, LogitRow
from hotswap.serve.engine.request import Job
from hotswap.serve.model.rowkinds import EngineKinds
from hotswap.serve.model.runner import Runner


def prefill(
    runner: Runner,
    plan: BatchPlan,
    kinds: EngineKinds,
    jobs: list[Job],
    all_positions: bool = False,
) -> list[torch.Tensor | None]:
    """Feed each bound job the next ``job.chunk`` positions of its prefill (chunked prefill: a long prompt takes
    several steps), from cache position ``job.position`` on. Returns, for a job whose prefill this completes, its
    logits at the last position (V,), or over its prompt's positions (L, V) with ``all_positions``; None for others."""
    assert jobs and all(j.row >= 0 and j.prefilling and j.chunk > 0 for j in jobs), "prefill takes bound jobs' chunks"
    plan.set([j.slots for j in jobs], runner.device, [j.req.rank or 0 for j in jobs])
    chunks, starts, skips = [], [], []
    for job, text in zip(jobs, runner.embed_rows([j.text_ids for j in jobs]), strict=True):  # (L, hidden) each
        # (virtual + text tokens, hidden) from cache position offset; positions before it are written, not computed
        emb, offset, skip = kinds.context(runner.cache, job.row, job.position, job.slots, text)
        start = max(job.position, offset)
        chunks.append(emb[start - offset : start - offset + job.chunk])
        starts.append(start)
        skips.append(skip)
    ends = [start + c.shape[0] for start, c in zip(starts, chunks, strict=True)]
    for job, end in zip(jobs, ends, strict=True):
        job.cache_end = max(job.cache_end, end)  # before the forward: a failed one has written too
    logits = runner.prefill([j.row for j in jobs], chunks, starts, all_positions)
    if all_positions:
        logits = [x[skip:] for x, skip in zip(logits, skips, strict=True)]  # the text's positions
    if kinds.any_logits:
        logits = _with_offsets(kinds, jobs, starts, ends, logits, last_only=not all_positions)
    out: list[torch.Tensor | None] = []
    for job, end, x in zip(jobs, ends, logits, strict=True):
        job.position = end
        out.append(None if job.prefilling else x)
    return out


def _with_offsets(
    kinds: EngineKinds, jobs: list[Job], starts: list[int], ends: list[int], logits: list[torch.Tensor], last_only: bool
) -> list[torch.Tensor]:
    """Add the logit kinds' offsets: they see text only, so each job's chunk feeds them the text tokens among cache
    positions [start, end), at their index in the text."""
    rows: list[LogitRow | None] = []
    for job, start, end in zip(jobs, starts, ends, strict=True):
        text_start = job.prefill_end - len(job.text_ids)  # context positions come first
        first, stop = max(start - text_start, 0), end - text_start
        rows.append(LogitRow(job.row, job.slots, job.text_ids[first:stop], first) if stop > first else None)
    offsets = kinds.offsets(rows, last_only)
    return [x if o is None else x + o for x, o in zip(logits, offsets, strict=True)]


def decode_step(runner: Runner, plan: BatchPlan, kinds: EngineKinds, jobs: list[Job], full: bool) -> list[torch.Tensor]:
    """Feed each job its last generated token at ``job.position`` (writing its cache there); returns next-token
    logits (V,) per job. ``full``: the jobs are all running rows, decoded in place over rows [0, max row]."""
    assert jobs and all(j.generated and j.row >= 0 for j in jobs), "decode feeds bound jobs their last token"
    n = runner.decode_rows(max(j.row for j in jobs) + 1) if full else len(jobs)
    tokens = torch.zeros(n, dtype=torch.long)  # (n,)
    positions = torch.full((n,), -1, dtype=torch.long)  # (n,); idle rows inside [0, n) stay padding
    rows = list(range(n)) if full else [j.row for j in jobs]
    plan_rows: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    plan_ranks = [0] * n
    for i, job in enumerate(jobs):
        job.cache_end = max(job.cache_end, job.position + 1)
        b = job.row if full else i
        tokens[b], positions[b] = job.generated[-1], job.position
        plan_rows[b], plan_ranks[b] = job.slots, job.req.rank or 0
    plan.set(plan_rows, runner.device, plan_ranks)
    logits = runner.decode(rows, tokens, positions, full)  # (n, V)
    chosen = [logits[j.row if full else i] for i, j in enumerate(jobs)]  # (V,) each
    if kinds.any_logits:  # logit kinds see text only: the fed token's index in prompt + generated
        fed = [LogitRow(j.row, j.slots, j.generated[-1:], len(j.prompt_ids) + len(j.generated) - 1) for j in jobs]
        chosen = [x if o is None else x + o for x, o in zip(chosen, kinds.offsets(fed, True), strict=True)]
    return chosen
