"""The model step, as small free functions (gpt-fast's ``prefill`` / ``decode_one_token``): each sets the batch
plan (which adapter slots, at which weights and rank, every row uses), runs the base forward over the jobs'
cache rows, adds proxy-tuning offsets, and returns next-token logits per job. Engine thread, step lock held.
"""

from __future__ import annotations

import torch

from hotswap.serve.adapters import LoadedAdapter
from hotswap.serve.layers import BatchPlan
from hotswap.serve.proxy import ProxyBank, ProxyRow
from hotswap.serve.request import Job
from hotswap.serve.runner import Runner


def prefill(
    runner: Runner,
    plan: BatchPlan,
    proxies: ProxyBank,
    resident: dict[int, LoadedAdapter],
    jobs: list[Job],
    all_positions: bool = False,
) -> list[torch.Tensor]:
    """Prefill newly bound rows in one batch; returns last-position logits (V,) per job, or (L, V) over each
    job's prompt positions with ``all_positions``. Sets each job's next cache position."""
    assert jobs and all(j.row >= 0 and not j.generated for j in jobs), "prefill takes bound jobs, before decoding"
    texts, offsets, skips = [], [], []
    for job in jobs:
        emb, offset, skip = _context(runner, resident, job)
        texts.append(emb)
        offsets.append(offset)
        skips.append(skip)
    for job, emb, offset in zip(jobs, texts, offsets, strict=True):
        job.position = offset + emb.shape[0]
        job.cache_end = max(job.cache_end, job.position)  # before the forward: a failed one has written too
    plan.set([j.slots for j in jobs], runner.device, [j.req.rank or 0 for j in jobs])
    logits = runner.prefill([j.row for j in jobs], texts, offsets, all_positions)
    if all_positions:
        logits = [x[s:] for x, s in zip(logits, skips, strict=True)]
    if proxies:
        extra = proxies.offsets([ProxyRow(j.row, j.slots, j.prompt_ids, 0) for j in jobs], last_only=not all_positions)
        logits = [x if o is None else x + o for x, o in zip(logits, extra, strict=True)]
    return logits


def _context(runner: Runner, resident: dict[int, LoadedAdapter], job: Job) -> tuple[torch.Tensor, int, int]:
    """A job's prompt embeddings (L, hidden) with its context adapter applied: prompt tuning's virtual tokens go
    first (``skip`` of them), prefix tuning's keys/values fill cache positions [0, offset) of its row."""
    emb = runner.embed(torch.tensor(job.prompt_ids, device=runner.device))  # (L, hidden)
    offset, skip = 0, 0
    for slot, _ in job.slots:
        adapter = resident[slot]
        if adapter.prefix_kv is not None:
            runner.write_prefix(job.row, adapter.prefix_kv)
            offset = adapter.prefix_len
        if adapter.prompt_embeds is not None:
            emb = torch.cat([adapter.prompt_embeds.to(emb.dtype), emb])  # (P + L, hidden), virtual tokens first
            skip = adapter.virtual_tokens
    return emb, offset, skip


def decode_step(runner: Runner, plan: BatchPlan, proxies: ProxyBank, jobs: list[Job], full: bool) -> list[torch.Tensor]:
    """Feed each job its last generated token at ``job.position`` (writing its cache there); returns next-token
    logits (V,) per job. ``full``: the jobs are all running rows, decoded in place over rows [0, max row]."""
    assert jobs and all(j.generated and j.row >= 0 for j in jobs), "decode feeds bound jobs their last token"
    n = max(j.row for j in jobs) + 1 if full else len(jobs)
    tokens = torch.zeros(n, dtype=torch.long)  # (n,)
    positions = torch.full((n,), -1, dtype=torch.long)  # (n,); idle rows inside [0, n) stay padding
    rows = torch.arange(n) if full else torch.tensor([j.row for j in jobs])  # (n,)
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
    if proxies:  # the small models see text only: the fed token's index in prompt + generated
        rows_ = [ProxyRow(j.row, j.slots, j.generated[-1:], len(j.prompt_ids) + len(j.generated) - 1) for j in jobs]
        chosen = [x if o is None else x + o for x, o in zip(chosen, proxies.offsets(rows_, True), strict=True)]
    return chosen
