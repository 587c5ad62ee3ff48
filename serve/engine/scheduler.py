"""The scheduler: the bounded waiting queue, the cache rows and the adapter slots each row holds, cancels, and
the adapter loads that requests and Load calls wait on.

Admission runs on the engine thread between steps: a request whose adapter is still loading waits without
holding anyone up; one whose adapter failed to load ends with that error (one load, one answer for everyone
waiting on it). With the paged KV cache a request is admitted while blocks remain for its prefill (sharing the
cached blocks of its prompt's prefix under its serving key), later ones queue behind it; a running row that needs
a block when none is left preempts the youngest row, which frees its blocks and is recomputed when readmitted.
Long prefills are fed in chunks of at most ``max_prefill_tokens`` per step, between the running rows' decode steps.
Every method takes the engine's lock (the condition shared with the adapter pool, re-entrant).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

from hotswap.errors import CapacityExceeded, EngineClosed, HotswapError, InvalidArgument
from hotswap.serve.engine.pool import AdapterPool
from hotswap.serve.engine.request import Job
from hotswap.serve.engine.types import EngineObserver, FinishReason
from hotswap.serve.model.kvcache import PagedCache, block_digests
from hotswap.serve.model.runner import Runner


class Scheduler:
    def __init__(
        self,
        max_queue: int,
        pool: AdapterPool,
        runner: Runner,
        lock: threading.Condition,
        observer: EngineObserver,
        base_fingerprint: str,
        prefix_cache: bool = True,
        max_prefill_tokens: int = 0,
    ) -> None:
        self.max_queue = max_queue
        self.pool, self.runner, self.lock, self.observer = pool, runner, lock, observer
        self.cache = runner.cache
        self.paged = isinstance(self.cache, PagedCache)
        self.prefix_cache = prefix_cache and self.paged
        self.base_fingerprint = base_fingerprint
        self.max_prefill_tokens = max_prefill_tokens  # per step, over all prefilling rows; 0 = unlimited
        self.waiting: list[Job] = []
        self.rows: list[Job | None] = [None] * runner.max_batch  # cache row -> the job running in it
        self.wants: dict[str, list[Future[int]]] = {}  # Load calls waiting for an adapter (exact ref) to be resident
        self.closed = False
        self._admissions = 0

    # -- callers' threads ---------------------------------------------------------------------------
    def add(self, jobs: list[Job]) -> None:
        """Queue requests together (their adapters start loading now): the next step sees all of them or none, so a
        batch submitted at once is admitted as one. Refused as a whole when closed or the queue cannot hold them."""
        with self.lock:
            if self.closed:
                raise EngineClosed("the engine is shut down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise CapacityExceeded(f"queue is full ({self.max_queue} waiting at most); retry later")
            self.waiting.extend(jobs)
            for job in jobs:
                for ref, _ in job.adapters:
                    self.pool.note_request(ref)
            self.lock.notify_all()

    def want(self, ref: str, pin: bool) -> Future[int]:
        """A Load call: start loading the exact ``ref``; the future gets its slot, or the load's error."""
        future: Future[int] = Future()
        with self.lock:
            if self.closed:
                raise EngineClosed("the engine is shut down")
            if pin:
                self.pool.pin(ref, True)
            self.wants.setdefault(ref, []).append(future)
            self.pool.ensure_loading(ref)
            self.lock.notify_all()
        return future

    def running(self) -> list[Job]:
        """The rows past their prefill (decoding)."""
        with self.lock:
            return [j for j in self.rows if j is not None and not j.prefilling]

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests right now."""
        with self.lock:
            return len(self.waiting), sum(j is not None for j in self.rows)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.wants or any(self.rows))

    def close(self) -> None:
        """Refuse new work and wake the engine loop (which then stops)."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def drain(self) -> None:
        """After the loop stopped: running and waiting requests and pending Load calls fail with EngineClosed."""
        with self.lock:
            for job in [*self.waiting, *(j for j in self.rows if j is not None)]:
                job.handle.fail(EngineClosed("the engine shut down before this request finished"))
            for futures in self.wants.values():
                for fut in futures:
                    fut.set_exception(EngineClosed("the engine shut down before the adapter was loaded"))
            self.wants.clear()
            self.waiting.clear()
            self.rows = [None] * len(self.rows)

    # -- engine thread --------------------------------------------------------------------------------
    def admit(self) -> list[Job]:
        """One admission pass: answer Load calls, end cancelled requests and those whose adapter failed to load,
        bind waiting requests to free rows in order. Returns the newly admitted."""
        with self.lock:
            self._service_wants()
            admitted: list[Job] = []
            no_blocks = False  # once a request waits for KV blocks, later ones wait behind it
            for job in list(self.waiting):
                if job.handle.cancelled:
                    self.waiting.remove(job)
                    self.finish(job, FinishReason.CANCELLED)
                    continue
                failed = next((self.pool.failed[ref] for ref, _ in job.adapters if ref in self.pool.failed), None)
                if failed is not None:  # every request waiting on a failed load ends now (one load, one answer)
                    self.waiting.remove(job)
                    job.handle.fail(failed)
                    continue
                free = next((r for r, j in enumerate(self.rows) if j is None), None)
                if free is None or no_blocks:
                    continue  # no row: later requests cannot join either, but their cancels and failures end now
                try:
                    bound = self.bind(job, free)
                except HotswapError as e:  # this request's own problem (its length, its adapter's install)
                    self.waiting.remove(job)
                    job.handle.fail(e)
                    continue
                if bound:
                    self.waiting.remove(job)
                    if not job.preemptions:
                        job.timings.queue_s = time.perf_counter() - job.submitted
                    admitted.append(job)
                elif all(ref in self.pool.slot_of for ref, _ in job.adapters):
                    no_blocks = True  # its adapters are resident: it waits for blocks
            self.pool.failed.clear()  # reported to everyone waiting; a later request loads again
        return admitted

    def _service_wants(self) -> None:
        for ref in list(self.wants):
            error, slot = self.pool.failed.get(ref), None
            if error is None:
                try:
                    slot = self.pool.install(ref)
                except HotswapError as e:
                    error = e
            if error is not None:
                self.pool.pin(ref, False)  # a Load that failed pins nothing
            if error is not None or slot is not None:
                for fut in self.wants.pop(ref):
                    fut.set_exception(error) if error else fut.set_result(slot)  # type: ignore[func-returns-value]

    def drop_cancelled(self) -> list[Job]:
        """End the requests whose caller cancelled (freeing their rows); returns the rows still decoding."""
        with self.lock:
            for job in [j for j in self.rows if j is not None and j.handle.cancelled]:
                self.finish(job, FinishReason.CANCELLED)
            return [j for j in self.rows if j is not None and not j.prefilling]

    def bind(self, job: Job, row: int, share: bool = True) -> bool:
        """Give ``job`` cache row ``row`` if all its adapters are resident (installing host-ready ones) and the KV
        cache has room for its prefill (``share``: reusing cached prompt blocks).

        Each slot is acquired as soon as it is installed, so installing a later adapter of the same
        request can never evict an earlier one; on failure every acquired slot is released.
        """
        slots: list[tuple[int, float]] = []
        bound, hit = False, 0
        with self.lock:
            try:
                for ref, weight in job.adapters:
                    slot = self.pool.install(ref)
                    if slot is None:
                        return False
                    self.pool.acquire(slot)
                    slots.append((slot, weight))
                extra = self.pool.kinds.context_positions(slots)
                # the engine sizes the KV cache for one row of max_seq_len at least: a request within it always fits
                if extra + len(job.prompt_ids) + job.req.max_new_tokens > self.runner.max_seq_len:
                    raise InvalidArgument(
                        f"{extra} adapter context tokens + prompt ({len(job.prompt_ids)}) + max_new_tokens "
                        f"({job.req.max_new_tokens}) exceed max_seq_len {self.runner.max_seq_len}"
                    )
                job.prefill_end = extra + len(job.text_ids)
                job.digests = self._digests(job, slots) if self.prefix_cache and share else []
                reserved = self.cache.reserve(row, job.prefill_end, job.digests)
                if reserved is None:
                    return False  # no blocks now: it waits (rows finish, cached blocks age out)
                job.position = hit = reserved
                bound = True
            finally:
                if not bound:
                    for slot, _ in slots:
                        self.pool.release(slot)
            if hit:
                self.observer.prefix_hit(job.adapters, hit)
            self._admissions += 1
            job.slots, job.row, job.admitted = slots, row, self._admissions
            self.rows[row] = job
        return True

    def _digests(self, job: Job, slots: list[tuple[int, float]]) -> list[bytes]:
        """Prefix-cache digests of the full blocks of the job's sequence under its serving key: the base, the exact
        adapters with weights, and the rank asked for. Context positions belong to the adapters, so they enter as
        placeholders. Rows with logit offsets share nothing (their kinds must see the whole text)."""
        if self.pool.kinds.offset_logits(slots):
            return []
        key = json.dumps([self.base_fingerprint, job.adapters, job.req.rank or 0]).encode()
        context = [-1] * (job.prefill_end - len(job.text_ids))
        return block_digests(key, context + job.text_ids, self.cache.block_size)

    def prefill_batch(self) -> list[Job]:
        """The rows to prefill this step, oldest first, each with ``job.chunk`` positions (at most
        ``max_prefill_tokens`` over all of them)."""
        with self.lock:
            jobs = sorted((j for j in self.rows if j is not None and j.prefilling), key=lambda j: j.admitted)
            budget, out = self.max_prefill_tokens or self.runner.max_seq_len * len(jobs), []
            for job in jobs:
                if budget <= 0:
                    break
                job.chunk = min(job.prefill_end - job.position, budget)
                budget -= job.chunk
                out.append(job)
            return out

    def prefilled(self, jobs: list[Job]) -> None:
        """Offer finished prefills' full prompt blocks to the prefix cache (once their logits proved finite)."""
        with self.lock:
            for job in jobs:
                if job.digests and self.rows[job.row] is job:
                    self.cache.register(job.row, job.digests, [ref for ref, _ in job.adapters])

    def make_room(self, jobs: list[Job]) -> list[Job]:
        """Give every decoding job a block for its next position, preempting the youngest rows while the cache has
        none; returns the jobs that still decode this step."""
        with self.lock:
            keep = sorted(jobs, key=lambda j: j.admitted)
            for job in list(keep):
                while job in keep and not self.cache.extend(job.row, job.position):
                    victim = max((j for j in self.rows if j is not None), key=lambda j: j.admitted)
                    self.preempt(victim)
                    if victim in keep:
                        keep.remove(victim)
            return keep

    def preempt(self, job: Job) -> None:
        """Free ``job``'s row and blocks and queue it first again: readmitted, it recomputes its prompt and what it
        generated, then goes on (its stream and its sampler's state are kept)."""
        with self.lock:
            self.unbind(job)
            job.row, job.slots, job.position, job.cache_end, job.chunk = -1, [], 0, 0, 0
            job.preemptions += 1
            self.waiting.insert(0, job)
            self.observer.preempted()

    def bind_now(self, jobs: list[Job]) -> None:
        """Bind every job to a free row now, or none (forward_logits, whose adapters were just loaded)."""
        with self.lock:
            free = [r for r, j in enumerate(self.rows) if j is None]
            if len(free) < len(jobs):
                raise CapacityExceeded("forward_logits needs free rows; the engine is busy")
            try:
                for job, row in zip(jobs, free, strict=False):
                    if not self.bind(job, row, share=False):  # every position computed: all of them are asked for
                        raise CapacityExceeded("forward_logits: the adapters were evicted or the KV cache is full")
            except HotswapError:
                for bound in jobs:
                    if bound.row >= 0:
                        self.unbind(bound)
                raise

    def unbind(self, job: Job) -> None:
        with self.lock:
            # Zero what the row wrote: a later row attends over these positions masked, and a masked NaN or inf
            # (a faulted adapter's keys) would still reach it (softmax weight 0 times NaN is NaN).
            self.cache.release(job.row, job.cache_end)
            self.pool.kinds.clear_row(job.row, job.cache_end)
            self.rows[job.row] = None
            for slot, _ in job.slots:
                self.pool.release(slot)
            self.lock.notify_all()

    def finish(self, job: Job, reason: FinishReason) -> None:
        """End one request normally (stop, length, cancelled), freeing its row and slots."""
        with self.lock:
            self._free(job)
            job.finish(reason)

    def fail(self, job: Job, error: HotswapError) -> None:
        """End one request with ``error``, freeing its row and slots."""
        with self.lock:
            self._free(job)
            job.handle.fail(error)

    def fail_running(self, error: HotswapError) -> None:
        with self.lock:
            for job in [j for j in self.rows if j is not None]:
                self.fail(job, error)

    def _free(self, job: Job) -> None:
        if job.row >= 0 and self.rows[job.row] is job:
            self.unbind(job)
