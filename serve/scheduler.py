"""The scheduler: the bounded waiting queue, the cache rows and the adapter slots each row holds, cancels, and
the adapter loads that requests and Load calls wait on.

Admission runs on the engine thread between steps: a request whose adapter is still loading waits without
holding anyone up; one whose adapter failed to load ends with that error (one load, one answer for everyone
waiting on it). Every method takes the engine's lock (the condition shared with the adapter pool, re-entrant).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from hotswap.errors import CapacityExceeded, EngineClosed, HotswapError, InvalidArgument
from hotswap.serve.pool import AdapterPool
from hotswap.serve.proxy import ProxyBank
from hotswap.serve.request import Job
from hotswap.serve.runner import Runner


class Scheduler:
    def __init__(
        self, max_queue: int, pool: AdapterPool, runner: Runner, proxies: ProxyBank, lock: threading.Condition
    ) -> None:
        self.max_queue = max_queue
        self.pool, self.runner, self.proxies, self.lock = pool, runner, proxies, lock
        self.waiting: list[Job] = []
        self.rows: list[Job | None] = [None] * runner.max_batch  # cache row -> the job running in it
        self.wants: dict[str, list[Future[int]]] = {}  # Load calls waiting for an adapter (exact ref) to be resident
        self.closed = False

    # -- callers' threads ---------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        """Queue a request (its adapters start loading now), or refuse it: closed, or the queue is full."""
        with self.lock:
            if self.closed:
                raise EngineClosed("the engine is shut down")
            if len(self.waiting) >= self.max_queue:
                raise CapacityExceeded(f"queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(job)
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
        with self.lock:
            return [j for j in self.rows if j is not None]

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
            for job in list(self.waiting):
                if job.handle.cancelled:
                    self.waiting.remove(job)
                    self.finish(job, "cancelled")
                    continue
                failed = next((self.pool.failed[ref] for ref, _ in job.adapters if ref in self.pool.failed), None)
                if failed is not None:  # every request waiting on a failed load ends now (one load, one answer)
                    self.waiting.remove(job)
                    job.handle.fail(failed)
                    continue
                free = next((r for r, j in enumerate(self.rows) if j is None), None)
                if free is None:
                    continue  # no row: later requests cannot join either, but their cancels and failures end now
                try:
                    bound = self.bind(job, free)
                except HotswapError as e:  # this request's own problem (its length, its adapter's install)
                    self.waiting.remove(job)
                    job.handle.fail(e)
                    continue
                if bound:
                    self.waiting.remove(job)
                    job.timings.queue_s = time.perf_counter() - job.submitted
                    admitted.append(job)
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
        """End the running requests whose caller cancelled (freeing their rows); returns the rows still running."""
        with self.lock:
            for job in [j for j in self.rows if j is not None and j.handle.cancelled]:
                self.finish(job, "cancelled")
            return [j for j in self.rows if j is not None]

    def bind(self, job: Job, row: int) -> bool:
        """Give ``job`` cache row ``row`` if all its adapters are resident (installing host-ready ones).

        Each slot is acquired as soon as it is installed, so installing a later adapter of the same
        request can never evict an earlier one; on failure every acquired slot is released.
        """
        slots: list[tuple[int, float]] = []
        bound = False
        with self.lock:
            try:
                for ref, weight in job.adapters:
                    slot = self.pool.install(ref)
                    if slot is None:
                        return False
                    self.pool.acquire(slot)
                    slots.append((slot, weight))
                extra = sum(self._context_len(s) for s, _ in slots)
                if extra + len(job.prompt_ids) + job.req.max_new_tokens > self.runner.max_seq_len:
                    raise InvalidArgument(
                        f"{extra} adapter context tokens + prompt ({len(job.prompt_ids)}) + max_new_tokens "
                        f"({job.req.max_new_tokens}) exceed max_seq_len {self.runner.max_seq_len}"
                    )
                bound = True
            finally:
                if not bound:
                    for slot, _ in slots:
                        self.pool.release(slot)
            job.slots, job.row = slots, row
            self.rows[row] = job
        return True

    def bind_now(self, jobs: list[Job]) -> None:
        """Bind every job to a free row now, or none (forward_logits, whose adapters were just loaded)."""
        with self.lock:
            free = [r for r, j in enumerate(self.rows) if j is None]
            if len(free) < len(jobs):
                raise CapacityExceeded("forward_logits needs free rows; the engine is busy")
            try:
                for job, row in zip(jobs, free, strict=False):
                    if not self.bind(job, row):
                        raise CapacityExceeded(f"adapters of a request were evicted before use: {job.adapters}")
            except HotswapError:
                for bound in jobs:
                    if bound.row >= 0:
                        self.unbind(bound)
                raise

    def unbind(self, job: Job) -> None:
        with self.lock:
            # Zero what the row wrote: a later row attends over these positions masked, and a masked NaN or inf
            # (a faulted adapter's keys) would still reach it (softmax weight 0 times NaN is NaN).
            self.runner.clear_row(job.row, job.cache_end)
            self.proxies.clear_row(job.row, job.cache_end)
            self.rows[job.row] = None
            for slot, _ in job.slots:
                self.pool.release(slot)
            self.lock.notify_all()

    def finish(self, job: Job, reason: str) -> None:
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

    def _context_len(self, slot: int) -> int:
        adapter = self.pool.resident[slot]
        return adapter.prefix_len + adapter.virtual_tokens

    def _free(self, job: Job) -> None:
        if job.row >= 0 and self.rows[job.row] is job:
            self.unbind(job)
