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
    device = runner.device
    texts, offsets, skips = [], [], []
    for job in jobs:
        emb, offset, skip = _context(runner, resident, job)
        texts.append(emb)
        offsets.append(offset)
        skips.append(skip)
    lengths = [e.shape[0] for e in texts]
    embeds = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True)  # (J, Lmax, hidden)
    offs = torch.tensor(offsets, device=device)
    positions = offs[:, None] + torch.arange(embeds.shape[1], device=device)[None, :]  # (J, Lmax)
    # a short row's padding may run past the cache (a prefix row beside a long prompt): park it on the last
    # position, which the row writes again before it could ever read it
    positions = positions.clamp(max=runner.max_seq_len - 1)
    for job, end in zip(jobs, (positions.max(dim=1).values + 1).tolist(), strict=True):
        job.cache_end = max(job.cache_end, end)  # before the forward: a failed one has written too
    rows = torch.tensor([j.row for j in jobs], device=device)  # (J,)
    plan.set([j.slots for j in jobs], device, [j.req.rank or 0 for j in jobs])
    hidden = runner.forward(rows, embeds, positions)  # (J, Lmax, hidden)
    for job, offset, n in zip(jobs, offsets, lengths, strict=True):
        job.position = offset + n
    if all_positions:
        logits = [runner.logits(hidden[i, s:n]) for i, (s, n) in enumerate(zip(skips, lengths, strict=True))]
    else:
        logits = list(runner.logits(hidden[torch.arange(len(jobs)), torch.tensor(lengths) - 1]))  # (V,) each
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
    tokens = torch.zeros(n, 1, dtype=torch.long)  # (n, 1)
    positions = torch.zeros(n, 1, dtype=torch.long)  # (n, 1)
    rows = torch.arange(n) if full else torch.tensor([j.row for j in jobs])  # (n,)
    plan_rows: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    plan_ranks = [0] * n
    for i, job in enumerate(jobs):
        job.cache_end = max(job.cache_end, job.position + 1)
        b = job.row if full else i  # idle rows inside [0, n) are masked padding
        tokens[b, 0], positions[b, 0] = job.generated[-1], job.position
        plan_rows[b], plan_ranks[b] = job.slots, job.req.rank or 0
    device = runner.device
    plan.set(plan_rows, device, plan_ranks)
    embeds = runner.embed(tokens.to(device))  # (n, 1, hidden)
    hidden = runner.forward(rows.to(device), embeds, positions.to(device), full)  # (n, 1, hidden)
    logits = runner.logits(hidden[:, 0])  # (n, V)
    chosen = [logits[j.row if full else i] for i, j in enumerate(jobs)]  # (V,) each
    if proxies:  # the small models see text only: the fed token's index in prompt + generated
        rows_ = [ProxyRow(j.row, j.slots, j.generated[-1:], len(j.prompt_ids) + len(j.generated) - 1) for j in jobs]
        chosen = [x if o is None else x + o for x, o in zip(chosen, proxies.offsets(rows_, True), strict=True)]
    return chosen
