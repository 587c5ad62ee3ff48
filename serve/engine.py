"""The engine: one frozen base, many adapters applied unmerged row by row, continuous batching.

One engine thread runs the loop: install adapters that finished loading, admit waiting requests
into free rows (a request whose adapter is still loading waits without holding anyone up),
prefill the newcomers, run one decode step for every running row, retire finished rows. Requests
join and leave between steps; a finished row's cache row is reused at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from hotswap.basemodel import bundled_tokenizer, encode_prompt, fingerprint, load_model
from hotswap.errors import AdapterFault, CapacityExceeded, EngineClosed, HotswapError, InvalidArgument, clip_message
from hotswap.registry import Registry
from hotswap.serve.adapters import BaseInfo, decoder_linears
from hotswap.serve.config import DTYPES, EngineConfig
from hotswap.serve.layers import BatchPlan, MultiAdapterLinear
from hotswap.serve.pool import AdapterPool
from hotswap.serve.proxy import ProxyBank, ProxyRow
from hotswap.serve.runner import Runner
from hotswap.serve.sampling import RowSampler, choose_tokens
from hotswap.serve.types import EngineObserver, Request, Result, Timings

log = logging.getLogger(__name__)

_CONTEXT_METHODS = ("prefix", "prompt")  # change the row's context, so at most one per request, weight 1
UNHEALTHY_AFTER = 3  # steps failing in a row (for no request's fault) before the engine reports unhealthy
MAX_BACKOFF_S = 2.0  # longest pause after a failed step


class RequestHandle:
    """A submitted request: iterate for token ids as they come, ``result()`` to wait, ``cancel()``."""

    def __init__(self) -> None:
        self._events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: HotswapError | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[int]:
        while (tokens := self.next_tokens()) is not None:
            yield from tokens

    def next_tokens(self) -> list[int] | None:
        """Wait for the next token, and take every token already produced after it too (a slow reader gets
        them in one piece); None once the request has finished. Raises the request's error."""
        tokens: list[int] = []
        block = True
        while True:
            try:
                kind, value = self._events.get(block=block)
            except queue.Empty:
                return tokens
            if kind == "token":
                tokens.append(value)  # type: ignore[arg-type]
                block = False
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                self._events.put((kind, value))  # keep the end for the next call
                return tokens or None

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError("request still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Leave the batch at the next step (finish_reason 'cancelled'); its row and slots are freed."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, result: Result | None, error: HotswapError | None = None) -> None:
        self._result, self._error = result, error
        self._events.put(("error", error) if error else ("done", None))
        self._done.set()


@dataclass
class _Job:
    req: Request
    prompt_ids: list[int]
    adapters: list[tuple[str, float]]  # exact refs ("name@3") and weights
    handle: RequestHandle
    sampler: RowSampler
    submitted: float
    row: int = -1
    slots: list[tuple[int, float]] = field(default_factory=list)
    position: int = 0  # next cache position to write
    cache_end: int = 0  # cache positions [0, cache_end) of the row may hold this job's keys/values
    generated: list[int] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)


class Engine:
    """``Engine(base="path/to/base", registry="path-or-url", max_batch=32)``; see README for the API."""

    def __init__(
        self,
        base: str | Path,
        registry: Registry | str | Path | None = None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        **kw,
    ) -> None:
        self.config = replace(config or EngineConfig(), **kw)
        self.observer = observer or EngineObserver()
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.base_path = Path(base)
        self.base_fingerprint = fingerprint(self.base_path)
        self.model = load_model(self.base_path, dtype=DTYPES[self.config.dtype], device=self.config.device)
        self.tokenizer = bundled_tokenizer(self.base_path)
        cfg = self.model.config
        self.eos_ids = set(_as_list(getattr(self.model.generation_config, "eos_token_id", None) or cfg.eos_token_id))
        self.plan = BatchPlan()
        base_info = BaseInfo.of(self.model)
        self.layers = self._wrap_linears()
        self.runner = Runner(self.model, self.config.max_batch, self.config.max_seq_len)
        self.proxies = ProxyBank(self.config.max_batch, self.config.max_seq_len, self.runner.device)
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self.pool = AdapterPool(
            self.registry,
            base_info,
            self.base_fingerprint,
            self.layers,
            self.proxies,
            self.config.max_resident,
            self.config.host_cache_bytes,
            self.config.max_rank,
            self._cv,
            self.observer,
        )
        self._waiting: list[_Job] = []
        self._rows: list[_Job | None] = [None] * self.config.max_batch
        self._wants: dict[str, list[Future[int]]] = {}
        self._closed = False
        self.healthy = True  # False after UNHEALTHY_AFTER steps in a row failed for no request's fault
        self._failed_steps = 0
        self._step_failed = False
        on_cpu = torch.device(self.config.device).type == "cpu"
        self._prefill_threads = (self.config.prefill_threads or torch.get_num_threads()) if on_cpu else 1
        self._decode_threads = (self.config.decode_threads or torch.get_num_threads()) if on_cpu else 1
        self._thread = threading.Thread(target=self._loop, name="hotswap-engine", daemon=True)
        self._thread.start()

    def _wrap_linears(self) -> dict[str, MultiAdapterLinear]:
        """Wrap every linear of the decoder blocks once; the base layers inside stay frozen and unmerged."""
        wrapped = {}
        for name, linear in decoder_linears(self.model).items():
            parent, _, child = name.rpartition(".")
            wrapped[name] = MultiAdapterLinear(linear, self.plan, self.config.max_resident)
            setattr(self.model.get_submodule(parent), child, wrapped[name])
        return wrapped

    # -- public API --------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request and return its handle at once. Bad input raises here, before queueing."""
        job = self._make_job(request)
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is shut down")
            if len(self._waiting) >= self.config.max_queue:
                raise CapacityExceeded(f"queue is full ({self.config.max_queue} waiting); retry later")
            self._waiting.append(job)
            for ref, _ in job.adapters:
                self.pool.note_request(ref)
            self._cv.notify_all()
        return job.handle

    def _make_job(self, request: Request) -> _Job:
        """Validate and resolve a request (adapter refs -> exact versions for this base)."""
        if len(request.adapters) > self.config.max_adapters_per_request:
            raise InvalidArgument(f"at most {self.config.max_adapters_per_request} adapters per request")
        top = float(torch.finfo(DTYPES[self.config.dtype]).max)
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in request.stop_token_ids):
            raise InvalidArgument(f"stop_token_ids must be below the vocabulary size {vocab}")
        adapters, context = [], 0
        for ref, weight in request.weighted_adapters():
            if abs(weight) > top:
                raise InvalidArgument(f"adapter weight for {ref} must be within ±{top:g} ({self.config.dtype})")
            manifest = self.registry.resolve(ref, base_fingerprint=self.base_fingerprint)
            if manifest.method in _CONTEXT_METHODS:
                context += 1
                if weight != 1.0:
                    raise InvalidArgument(f"{manifest.ref} ({manifest.method}) cannot be weighted; use weight 1")
            if request.rank is not None and manifest.method != "dylora":
                raise InvalidArgument(f"rank applies to DyLoRA adapters only; {manifest.ref} is {manifest.method}")
            adapters.append((manifest.ref, weight))
        if request.rank is not None and not adapters:
            raise InvalidArgument("rank applies to DyLoRA adapters only; this request uses the base model")
        if context > 1:
            raise InvalidArgument("a request can use at most one prefix- or prompt-tuning adapter")
        if len({ref for ref, _ in adapters}) > self.config.max_resident:
            raise CapacityExceeded(f"a request can use at most max_resident={self.config.max_resident} adapters")
        if (request.stop or request.prompt is not None) and self.tokenizer is None:
            raise InvalidArgument("text prompts and stop strings need a base with a tokenizer; send prompt_ids")
        prompt_ids = request.prompt_ids if request.prompt_ids is not None else self._encode(request.prompt or "")
        if max(prompt_ids) >= vocab:
            raise InvalidArgument(f"prompt_ids contains {max(prompt_ids)}, outside the vocabulary (size {vocab})")
        if len(prompt_ids) + request.max_new_tokens > self.config.max_seq_len:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds "
                f"max_seq_len {self.config.max_seq_len}"
            )
        return _Job(
            req=request,
            prompt_ids=list(prompt_ids),
            adapters=adapters,
            handle=RequestHandle(),
            sampler=RowSampler(request.temperature, request.top_k, request.top_p, request.seed),
            submitted=time.perf_counter(),
        )

    def generate(self, requests: list[Request]) -> list[Result]:
        """Submit all, wait for all, return results in order (raises the first request error)."""
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    def load_adapter(self, ref: str, pin: bool = False, timeout: float | None = None) -> str:
        """Make an adapter resident now (prefetch), optionally pinned against eviction. Returns its exact ref."""
        exact = self.registry.resolve(ref, base_fingerprint=self.base_fingerprint).ref
        future: Future[int] = Future()
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is shut down")
            if pin:
                self.pool.pin(exact, True)
            self._wants.setdefault(exact, []).append(future)
            self.pool.ensure_loading(exact)
            self._cv.notify_all()
        future.result(timeout)
        return exact

    def unload_adapter(self, ref: str) -> str:
        """Unpin and free an adapter's slot; rows using it finish first (new requests for it wait)."""
        exact = self.registry.resolve(ref).ref
        with self._step_lock, self._cv:  # an idle adapter's slot is cleared now, never mid-forward
            self.pool.unload(exact)
            self._cv.notify_all()
        return exact

    @property
    def alive(self) -> bool:
        """The engine loop is running (False once closed, or if its thread died)."""
        return self._thread.is_alive()

    def cache_tier(self, ref: str) -> str:
        """Where the exact ``ref`` is now: "resident" (in a slot), "host" (RAM, installs at once) or "registry"."""
        with self._cv:
            if ref in self.pool.slot_of:
                return "resident"
            return "host" if ref in self.pool.host else "registry"

    def resident(self) -> list[str]:
        with self._cv:
            return sorted(self.pool.slot_of)

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests right now."""
        with self._cv:
            return len(self._waiting), sum(j is not None for j in self._rows)

    def forward_logits(self, requests: list[Request]) -> list[torch.Tensor]:
        """Logits over each request's prompt positions, (L, V) per row, from ONE mixed batch (tests, benchmarks)."""
        if len(requests) > self.config.max_batch:
            raise CapacityExceeded(f"at most max_batch={self.config.max_batch} rows")
        jobs = [self._make_job(req) for req in requests]
        for job in jobs:
            for ref, _ in job.adapters:
                self.load_adapter(ref)
        with self._step_lock:
            with self._cv:
                free = [r for r, j in enumerate(self._rows) if j is None]
                if len(free) < len(jobs):
                    raise CapacityExceeded("forward_logits needs free rows; the engine is busy")
                try:
                    for job, row in zip(jobs, free, strict=False):
                        if not self._bind(job, row):
                            raise CapacityExceeded(f"adapters of a request were evicted before use: {job.adapters}")
                except HotswapError:
                    for bound in jobs:
                        if bound.row >= 0:
                            self._unbind(bound)
                    raise
            try:
                with torch.inference_mode():
                    return self._prefill(jobs, all_positions=True)
            finally:
                with self._cv:
                    for job in jobs:
                        self._unbind(job)

    def close(self) -> None:
        """Stop the loop; running and waiting requests fail with EngineClosed."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self.pool.close()
        with self._cv:
            for job in [*self._waiting, *(j for j in self._rows if j is not None)]:
                job.handle._finish(None, EngineClosed("the engine shut down before this request finished"))
            for futures in self._wants.values():
                for fut in futures:
                    fut.set_exception(EngineClosed("the engine shut down before the adapter was loaded"))
            self._wants.clear()
            self._waiting.clear()
            self._rows = [None] * self.config.max_batch

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._closed and not (self._waiting or self._wants or any(self._rows)):
                    self._cv.wait()
                if self._closed:
                    return
            self._step_failed = False
            try:
                busy = self._step()
            except Exception as e:  # a bug outside the forward: fail what is running, keep serving the rest
                log.exception("engine step failed")
                self._fail_running(HotswapError(f"engine step failed: {type(e).__name__}: {clip_message(str(e))}"))
                self._step_failed, busy = True, False
            self._health_after_step()
            if not busy:
                with self._cv:
                    self._cv.wait(timeout=0.01)  # waiting for adapters to load

    def _health_after_step(self) -> None:
        """Count steps that failed for no request's fault; back off so a persistent fault never spins the loop,
        and report unhealthy after ``UNHEALTHY_AFTER`` in a row (healthy again after the next good step)."""
        if not self._step_failed:
            if self._failed_steps:
                log.info("engine steps succeed again after %d failed", self._failed_steps)
                self._failed_steps = 0
                self._set_healthy(True)
            return
        self._failed_steps += 1
        if self._failed_steps >= UNHEALTHY_AFTER:
            self._set_healthy(False)
        backoff = min(MAX_BACKOFF_S, 0.05 * 2 ** (self._failed_steps - 1))
        with self._cv:
            self._cv.wait_for(lambda: self._closed, timeout=backoff)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            log.log(logging.INFO if healthy else logging.ERROR, "engine %s", "healthy" if healthy else
                    f"unhealthy: {self._failed_steps} steps in a row failed")  # fmt: skip
            self.observer.health(healthy)

    def _step(self) -> bool:
        """One scheduler iteration: install, admit, prefill newcomers, decode everyone. False if idle."""
        with self._step_lock, torch.inference_mode():
            with self._cv:
                self._service_wants()
                admitted = self._admit()
                self.pool.failed.clear()  # reported to everyone waiting; a later request loads again
            running = [j for j in self._rows if j is not None and j not in admitted]
            if admitted:
                torch.set_num_threads(self._prefill_threads)
                self._emit_all(*self._isolated(admitted, self._prefill))
            if running or admitted:
                torch.set_num_threads(self._decode_threads)
                self._decode()
        return bool(admitted or running)

    def _service_wants(self) -> None:
        for ref in list(self._wants):
            error, slot = self.pool.failed.get(ref), None
            if error is None:
                try:
                    slot = self.pool.install(ref)
                except HotswapError as e:
                    error = e
            if error is not None:
                self.pool.pin(ref, False)  # a Load that failed pins nothing
            if error is not None or slot is not None:
                for fut in self._wants.pop(ref):
                    fut.set_exception(error) if error else fut.set_result(slot)  # type: ignore[func-returns-value]

    def _admit(self) -> list[_Job]:
        admitted: list[_Job] = []
        for job in list(self._waiting):
            if job.handle.cancelled:
                self._waiting.remove(job)
                self._finish(job, "cancelled")
                continue
            failed = next((self.pool.failed[ref] for ref, _ in job.adapters if ref in self.pool.failed), None)
            if failed is not None:  # every request waiting on a failed load ends now (one load, one answer)
                self._waiting.remove(job)
                job.handle._finish(None, failed)
                continue
            free = next((r for r, j in enumerate(self._rows) if j is None), None)
            if free is None:
                continue  # no row: later requests cannot join either, but their cancels and failures end now
            try:
                bound = self._bind(job, free)
            except HotswapError as e:  # this request's own problem (its length, its adapter's install)
                self._waiting.remove(job)
                job.handle._finish(None, e)
                continue
            if bound:
                self._waiting.remove(job)
                job.timings.queue_s = time.perf_counter() - job.submitted
                admitted.append(job)
        return admitted

    def _bind(self, job: _Job, row: int) -> bool:
        """Give ``job`` cache row ``row`` if all its adapters are resident (installing host-ready ones).

        Each slot is acquired as soon as it is installed, so installing a later adapter of the same
        request can never evict an earlier one; on failure every acquired slot is released.
        """
        slots: list[tuple[int, float]] = []
        bound = False
        try:
            for ref, weight in job.adapters:
                slot = self.pool.install(ref)
                if slot is None:
                    return False
                self.pool.acquire(slot)
                slots.append((slot, weight))
            extra = sum(self._context_len(s) for s, _ in slots)
            if extra + len(job.prompt_ids) + job.req.max_new_tokens > self.config.max_seq_len:
                raise InvalidArgument(
                    f"{extra} adapter context tokens + prompt ({len(job.prompt_ids)}) + max_new_tokens "
                    f"({job.req.max_new_tokens}) exceed max_seq_len {self.config.max_seq_len}"
                )
            bound = True
        finally:
            if not bound:
                for slot, _ in slots:
                    self.pool.release(slot)
        job.slots, job.row = slots, row
        self._rows[row] = job
        return True

    def _unbind(self, job: _Job) -> None:
        # Zero what the row wrote: a later row attends over these positions masked, and a masked NaN or inf
        # (a faulted adapter's keys) would still reach it (softmax weight 0 times NaN is NaN).
        self.runner.clear_row(job.row, job.cache_end)
        self.proxies.clear_row(job.row, job.cache_end)
        self._rows[job.row] = None
        for slot, _ in job.slots:
            self.pool.release(slot)
        self._cv.notify_all()

    def _context_len(self, slot: int) -> int:
        adapter = self.pool.resident[slot]
        return adapter.prefix_len + adapter.virtual_tokens

    # -- model steps (engine thread, step lock held) -------------------------------------------------
    def _prefill(self, jobs: list[_Job], all_positions: bool = False) -> list[torch.Tensor]:
        """Prefill newly admitted rows in one batch; returns last-position logits (or all prompt positions)."""
        device = self.runner.device
        texts, offsets, skips = [], [], []
        for job in jobs:
            ids = torch.tensor(job.prompt_ids, device=device)
            emb = self.runner.embed(ids)  # (L, hidden)
            offset, skip = 0, 0
            for slot, _ in job.slots:
                adapter = self.pool.resident[slot]
                if adapter.prefix_kv is not None:
                    self.runner.write_prefix(job.row, adapter.prefix_kv)
                    offset = adapter.prefix_len
                if adapter.prompt_embeds is not None:
                    emb = torch.cat([adapter.prompt_embeds.to(emb.dtype), emb])  # virtual tokens first
                    skip = adapter.virtual_tokens
            texts.append(emb)
            offsets.append(offset)
            skips.append(skip)
        lengths = [e.shape[0] for e in texts]
        embeds = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True)  # (J, Lmax, hidden)
        offs = torch.tensor(offsets, device=device)
        positions = offs[:, None] + torch.arange(embeds.shape[1], device=device)[None, :]  # (J, Lmax)
        # a short row's padding may run past the cache (a prefix row beside a long prompt): park it on the last
        # position, which the row writes again before it could ever read it
        positions = positions.clamp(max=self.config.max_seq_len - 1)
        for job, end in zip(jobs, (positions.max(dim=1).values + 1).tolist(), strict=True):
            job.cache_end = max(job.cache_end, end)  # before the forward: a failed one has written too
        rows = torch.tensor([j.row for j in jobs], device=device)
        self.plan.set([j.slots for j in jobs], device, [j.req.rank or 0 for j in jobs])
        hidden = self.runner.forward(rows, embeds, positions)  # (J, Lmax, hidden)
        for job, offset, n in zip(jobs, offsets, lengths, strict=True):
            job.position = offset + n
        if all_positions:
            logits = [self.runner.logits(hidden[i, s:n]) for i, (s, n) in enumerate(zip(skips, lengths, strict=True))]
        else:
            logits = list(self.runner.logits(hidden[torch.arange(len(jobs)), torch.tensor(lengths) - 1]))  # (V,) each
        if self.proxies:
            rows = [ProxyRow(j.row, j.slots, j.prompt_ids, 0) for j in jobs]
            extra = self.proxies.offsets(rows, last_only=not all_positions)
            logits = [x if o is None else x + o for x, o in zip(logits, extra, strict=True)]
        return logits

    def _decode(self) -> None:
        with self._cv:
            for job in [j for j in self._rows if j is not None and j.handle.cancelled]:
                self._finish(job, "cancelled")
            active = [j for j in self._rows if j is not None]
        if not active:
            return
        self.observer.step(len(active))
        jobs, logits = self._isolated(active, self._decode_logits)
        for job in jobs:
            job.position += 1
        self._emit_all(jobs, logits)

    def _decode_logits(self, jobs: list[_Job]) -> list[torch.Tensor]:
        """Next-token logits (V,) per job after feeding its last token; writes its cache at ``job.position``."""
        full = len(jobs) == len(self._active_rows())
        n = max(j.row for j in jobs) + 1 if full else len(jobs)  # a full batch decodes rows [0, n) in place
        tokens = torch.zeros(n, 1, dtype=torch.long)
        positions = torch.zeros(n, 1, dtype=torch.long)
        rows = torch.arange(n) if full else torch.tensor([j.row for j in jobs])  # (n,)
        plan_rows: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        plan_ranks = [0] * n
        for i, job in enumerate(jobs):
            job.cache_end = max(job.cache_end, job.position + 1)
            b = job.row if full else i  # idle rows inside [0, n) are masked padding
            tokens[b, 0], positions[b, 0] = job.generated[-1], job.position
            plan_rows[b], plan_ranks[b] = job.slots, job.req.rank or 0
        device = self.runner.device
        self.plan.set(plan_rows, device, plan_ranks)
        embeds = self.runner.embed(tokens.to(device))  # (n, 1, hidden)
        hidden = self.runner.forward(rows.to(device), embeds, positions.to(device), full)  # (n, 1, hidden)
        logits = self.runner.logits(hidden[:, 0])  # (n, V)
        chosen = [logits[j.row if full else i] for i, j in enumerate(jobs)]
        if self.proxies:  # the small models see text only: the fed token's index in prompt + generated
            rows_ = [ProxyRow(j.row, j.slots, j.generated[-1:], len(j.prompt_ids) + len(j.generated) - 1) for j in jobs]
            chosen = [x if o is None else x + o for x, o in zip(chosen, self.proxies.offsets(rows_, True), strict=True)]
        return chosen

    def _active_rows(self) -> list[_Job]:
        return [j for j in self._rows if j is not None]

    # -- fault isolation -------------------------------------------------------------------------------
    def _isolated(
        self, jobs: list[_Job], run: Callable[[list[_Job]], list[torch.Tensor]]
    ) -> tuple[list[_Job], list[torch.Tensor]]:
        """``run(jobs)`` (one batched forward: logits per job); if it raises, find whose fault it is.

        Each job is run alone (a forward writes only its rows' cache at positions it rewrites, so running
        again is safe). A job that fails alone but runs without its adapters fails with AdapterFault; the
        others keep their logits. A job that fails even without adapters is no request's fault: it fails
        with an internal error, and if no job of the batch could run, the step counts as failed (back-off,
        health). Returns the jobs that ran and their logits."""
        try:
            return jobs, run(jobs)
        except Exception as e:
            if not jobs:
                raise
            batch_error = e
            if len(jobs) > 1:
                log.warning("a batched forward of %d rows failed (%s: %s); running them one by one",
                            len(jobs), type(e).__name__, clip_message(str(e), 200))  # fmt: skip
        ok: list[_Job] = []
        logits: list[torch.Tensor] = []
        engine_fault: Exception | None = None
        for job in jobs:
            try:
                if len(jobs) == 1:  # it already ran alone
                    raise batch_error
                logits.append(run([job])[0])
                ok.append(job)
                continue
            except Exception as e:
                error = e
            cause = f"{type(error).__name__}: {clip_message(str(error), 200)}"
            if job.adapters and self._runs_without_adapters(job, run):
                refs = ", ".join(ref for ref, _ in job.adapters)
                log.warning("request with %s failed alone, and runs without its adapters: %s", refs, cause)
                self._fail(job, AdapterFault(f"adapter {refs} failed in the forward ({cause}); other requests are "
                                             "unaffected"))  # fmt: skip
            else:
                if engine_fault is None:
                    engine_fault = error
                    log.error("engine forward failed", exc_info=error)
                self._fail(job, HotswapError(f"engine step failed: {cause}"))
        if engine_fault is not None and not ok:
            self._step_failed = True
        return ok, logits

    def _runs_without_adapters(self, job: _Job, run: Callable[[list[_Job]], list[torch.Tensor]]) -> bool:
        try:
            run([replace(job, adapters=[], slots=[])])
        except Exception:
            return False
        return True

    def _emit_all(self, jobs: list[_Job], logits: list[torch.Tensor]) -> None:
        if not jobs:
            return
        try:
            chosen = choose_tokens(torch.stack(logits), [j.sampler for j in jobs])
        except Exception:  # one row's sampling failed: choose row by row, so only that row ends
            log.exception("choosing the next tokens of %d rows failed; choosing row by row", len(jobs))
            chosen = [self._choose_alone(job, row) for job, row in zip(jobs, logits, strict=True)]
        now = time.perf_counter()
        with self._cv:
            for job, token in zip(jobs, chosen, strict=True):
                if token is None:
                    if not job.handle.done:  # not already failed by _choose_alone
                        self._fail(job, self._non_finite(job))
                    continue
                try:
                    self._emit(job, token, now)
                except Exception as e:  # e.g. the tokenizer on this row's text: this request's problem alone
                    log.exception("emitting a token failed")
                    self._fail(job, HotswapError(f"request failed: {type(e).__name__}: {clip_message(str(e), 200)}"))

    def _choose_alone(self, job: _Job, logits: torch.Tensor) -> int | None:
        try:
            return choose_tokens(logits[None], [job.sampler])[0]
        except Exception as e:
            self._fail(job, HotswapError(f"sampling failed: {type(e).__name__}: {clip_message(str(e), 200)}"))
            return None

    def _non_finite(self, job: _Job) -> HotswapError:
        where = f"at generated token {len(job.generated)}"
        if not job.adapters:
            return HotswapError(f"the base model's logits became NaN or infinite {where}")
        used = ", ".join(f"{ref} (weight {w:g})" for ref, w in job.adapters)
        return AdapterFault(f"logits became NaN or infinite {where} with adapter {used}: numerically unstable "
                            "at this weight; other requests are unaffected")  # fmt: skip

    def _emit(self, job: _Job, token: int, now: float) -> None:
        t = now - job.submitted
        if not job.generated:
            job.timings.ttft_s = t
        req = job.req
        if not req.ignore_eos and (token in self.eos_ids or token in req.stop_token_ids):
            self._finish(job, "stop")
            return
        job.generated.append(token)
        job.timings.token_times_s.append(t)
        job.handle._events.put(("token", token))
        if req.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
            if any(s in text for s in req.stop):
                self._finish(job, "stop")
                return
        if len(job.generated) >= req.max_new_tokens:
            self._finish(job, "length")

    def _finish(self, job: _Job, reason: str) -> None:
        if job.row >= 0 and self._rows[job.row] is job:
            self._unbind(job)
        job.timings.total_s = time.perf_counter() - job.submitted
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
            for stop in job.req.stop:
                text = text.split(stop, 1)[0]
        result = Result(
            token_ids=list(job.generated),
            text=text,
            finish_reason=reason,
            timings=job.timings,
            prompt_tokens=len(job.prompt_ids),
            adapters=list(job.adapters),
        )
        job.handle._finish(result)

    def _fail_running(self, error: HotswapError) -> None:
        with self._cv:
            for job in [j for j in self._rows if j is not None]:
                self._fail(job, error)

    def _fail(self, job: _Job, error: HotswapError) -> None:
        """End one request with ``error``, freeing its row and slots."""
        with self._cv:
            if job.row >= 0 and self._rows[job.row] is job:
                self._unbind(job)
            job.handle._finish(None, error)

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgument("this base has no tokenizer: send prompt_ids instead of prompt text")
        return encode_prompt(self.tokenizer, text, self.model.config.bos_token_id)


def _as_list(value: object) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [int(value)]  # type: ignore[arg-type]
