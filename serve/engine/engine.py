"""The engine: one frozen base, many adapters applied unmerged row by row, continuous batching.

One engine thread runs the loop: install adapters that finished loading, admit waiting requests
into free rows (a request whose adapter is still loading waits without holding anyone up),
prefill the newcomers, run one decode step for every running row, retire finished rows. Requests
join and leave between steps; a finished row's cache row is reused at once.

A request, from submit to a token: :meth:`Engine.submit` checks and resolves it into a :class:`.request.Job`
and queues it (:mod:`.scheduler`); the loop admits it into a cache row, runs :func:`.step.prefill` and then
:func:`.step.decode_step` under fault isolation (:mod:`.isolation`), and :meth:`Engine._emit` pushes each chosen
token to the request's :class:`.request.RequestHandle`, ending it on eos, a stop token, a stop string
(:mod:`.detok`) or its length.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from hotswap.basemodel import bundled_tokenizer, fingerprint, load_model
from hotswap.devices import free_memory, resolve_device, resolve_dtype, torch_dtype
from hotswap.errors import CapacityExceeded, HotswapError, InvalidArgument, clip_message
from hotswap.methods.api import BaseInfo, BatchPlan, EngineRows, decoder_experts, input_embedding, served_linears
from hotswap.quantization import check_quantize
from hotswap.registry import Manifest, Registry
from hotswap.serve.engine.config import EngineConfig
from hotswap.serve.engine.isolation import UNHEALTHY_AFTER, StepHealth, choose_isolated, run_isolated
from hotswap.serve.engine.pool import AdapterPool
from hotswap.serve.engine.request import Job, RequestHandle, make_job
from hotswap.serve.engine.scheduler import Scheduler
from hotswap.serve.engine.step import decode_step, prefill
from hotswap.serve.engine.types import EngineObserver, FinishReason, Request, Result
from hotswap.serve.model.kvcache import PagedCache
from hotswap.serve.model.layers import (
    MultiAdapterEmbedding,
    MultiAdapterExperts,
    MultiAdapterLinear,
    MultiAdapterModule,
)
from hotswap.serve.model.rowkinds import EngineKinds
from hotswap.serve.model.runner import Runner, kv_shape

__all__ = ["UNHEALTHY_AFTER", "Engine", "RequestHandle"]

log = logging.getLogger(__name__)


class Engine:
    """``Engine(base="path/to/base", registry="path-or-url", max_batch=32)``; see docs/serving.md for the API."""

    def __init__(
        self,
        base: str | Path,
        registry: Registry | str | Path | None = None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        **kw,
    ) -> None:
        self.config = replace(config or EngineConfig(), **kw)
        device = resolve_device(self.config.device)  # `auto` settles here: the engine's parts see the choice
        self.config = replace(self.config, device=device, dtype=resolve_dtype(self.config.dtype, base, device))
        self.observer = observer or EngineObserver()
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.base_path = Path(base)
        quantize = check_quantize(self.config.quantize)
        self.base_fingerprint = fingerprint(self.base_path, quantize)
        self.model = load_model(
            self.base_path, dtype=torch_dtype(self.config.dtype), device=self.config.device, quantize=quantize
        )
        self.tokenizer = bundled_tokenizer(self.base_path)
        cfg = self.model.config
        self.eos_ids = set(_as_list(getattr(self.model.generation_config, "eos_token_id", None) or cfg.eos_token_id))
        self.plan = BatchPlan()
        base_info = BaseInfo.of(self.model)
        self.layers = self._wrap_modules()
        c = self.config
        self.runner = Runner(self.model, c.max_batch, c.max_seq_len, c.kv_block_size, self._kv_blocks(), c.decode)
        self.kinds = EngineKinds(
            EngineRows(c.max_batch, c.max_seq_len, self.runner.device, self.model.dtype, self._side_runner)
        )
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self.pool = AdapterPool(
            self.registry,
            base_info,
            self.base_fingerprint,
            self.layers,
            self.kinds,
            self.config.max_resident,
            self.config.host_cache_bytes,
            self.config.max_rank,
            self._cv,
            self.observer,
        )
        self.scheduler = Scheduler(self.config.max_queue, self.pool, self.runner, self._cv, self.observer,
                                   self.base_fingerprint, c.prefix_cache, c.max_prefill_tokens)  # fmt: skip
        self.health = StepHealth(self.observer, self._cv, lambda: self.scheduler.closed)
        on_cpu = torch.device(self.config.device).type == "cpu"
        self._prefill_threads = (self.config.prefill_threads or torch.get_num_threads()) if on_cpu else 1
        self._decode_threads = (self.config.decode_threads or torch.get_num_threads()) if on_cpu else 1
        if on_cpu:  # a decode step's base products on the prefill's threads
            for layer in self.layers.values():
                if isinstance(layer, MultiAdapterLinear):
                    layer.base_threads = self._prefill_threads
        self._thread = threading.Thread(target=self._loop, name="hotswap-engine", daemon=True)
        self._thread.start()

    def _side_runner(self, model: torch.nn.Module) -> Runner:
        """A model run beside the base over the engine's rows (a logit kind's), with its own per-row cache."""
        return Runner(model, self.config.max_batch, self.config.max_seq_len)

    def _kv_blocks(self) -> int:
        """KV blocks for the paged cache: ``kv_cache_memory`` bytes, or that fraction of free device memory, or (0)
        what ``max_batch`` rows of ``max_seq_len`` would hold in a static cache."""
        c = self.config
        if not c.kv_block_size:
            return 0
        per_block = PagedCache.block_bytes(*kv_shape(self.model.config), c.kv_block_size, self.model.dtype)
        row_blocks = -(-c.max_seq_len // c.kv_block_size)
        if not c.kv_cache_memory:
            return c.max_batch * row_blocks
        size = c.kv_cache_memory if c.kv_cache_memory > 1 else c.kv_cache_memory * free_memory(c.device)
        blocks = int(size // per_block)
        if blocks < row_blocks:
            raise InvalidArgument(
                f"kv_cache_memory {c.kv_cache_memory:g} holds {blocks} blocks of {c.kv_block_size} positions "
                f"({per_block} bytes each); one row of max_seq_len {c.max_seq_len} needs {row_blocks}"
            )
        return blocks

    def _wrap_modules(self) -> dict[str, MultiAdapterModule]:
        """Wrap every linear and every MoE layer's experts of the decoder blocks, the output head and the input
        embedding once; the base modules inside stay frozen and unmerged."""
        wrapped: dict[str, MultiAdapterModule] = {}
        for wrapper, found in (
            (MultiAdapterLinear, served_linears),
            (MultiAdapterExperts, decoder_experts),
            (MultiAdapterEmbedding, input_embedding),
        ):
            for name, module in found(self.model).items():
                parent, _, child = name.rpartition(".")
                wrapped[name] = wrapper(module, self.plan, self.config.max_resident, self.model.dtype)
                setattr(self.model.get_submodule(parent), child, wrapped[name])
        return wrapped

    # -- public API --------------------------------------------------------------------------------
    def submit(self, request: Request, manifests: Sequence[Manifest] | None = None) -> RequestHandle:
        """Queue a request and return its handle at once. Bad input raises here, before queueing. ``manifests``:
        its adapters already resolved (e.g. by the server's authorization; the request names them by exact ref),
        so they are not resolved again."""
        job = self._make_job(request, manifests)
        self.scheduler.add([job])
        return job.handle

    def _make_job(self, request: Request, manifests: Sequence[Manifest] | None = None) -> Job:
        cfg = self.model.config
        return make_job(request, self.config, self.registry, self.base_fingerprint, cfg.vocab_size, self.tokenizer,
                        cfg.bos_token_id, manifests)  # fmt: skip

    def generate(self, requests: list[Request]) -> list[Result]:
        """Submit all at once (each checked first: a bad one queues none), wait for all, return results in order
        (raises the first request error). They join the batch together, as one offline batch."""
        jobs = [self._make_job(r) for r in requests]
        self.scheduler.add(jobs)
        return [job.handle.result() for job in jobs]

    def load_adapter(self, ref: str, pin: bool = False, timeout: float | None = None) -> str:
        """Make an adapter resident now (prefetch), optionally pinned against eviction. Returns its exact ref."""
        exact = self.registry.resolve(ref, base_fingerprint=self.base_fingerprint).ref
        self.scheduler.want(exact, pin).result(timeout)
        return exact

    def unload_adapter(self, ref: str) -> str:
        """Unpin and free an adapter's slot; rows using it finish first (new requests for it wait)."""
        exact = self.registry.resolve(ref).ref
        with self._step_lock, self._cv:  # an idle adapter's slot is cleared now, never mid-forward
            self.pool.unload(exact)
            self.runner.cache.drop(exact)  # its cached prompt blocks go too
            self._cv.notify_all()
        return exact

    @property
    def alive(self) -> bool:
        """The engine loop is running (False once closed, or if its thread died)."""
        return self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """False after ``UNHEALTHY_AFTER`` steps in a row failed for no request's fault (True after a good one)."""
        return self.health.healthy

    def cache_tier(self, ref: str) -> str:
        """Where the exact ``ref`` is now: "resident" (in a slot), "host" (RAM, installs at once) or "registry"."""
        with self._cv:
            if ref in self.pool.slot_of:
                return "resident"
            return "host" if ref in self.pool.host else "registry"

    def resident(self) -> list[str]:
        with self._cv:
            return sorted(self.pool.slot_of)

    def adapter_bytes(self, ref: str) -> int:
        """Bytes of the exact ``ref``'s tensors as served (0 unless it is resident or in host RAM): what a step
        reads for its rows, beside the base's weights."""
        with self._cv:
            slot = self.pool.slot_of.get(ref)
            loaded = self.pool.resident.get(slot) if slot is not None else self.pool.host.get(ref)
            return loaded.nbytes if loaded is not None else 0

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests right now."""
        return self.scheduler.counts()

    def forward_logits(self, requests: list[Request]) -> list[torch.Tensor]:
        """Logits over each request's prompt positions, (L, V) per row, from ONE mixed batch (tests, benchmarks)."""
        if len(requests) > self.config.max_batch:
            raise CapacityExceeded(f"at most max_batch={self.config.max_batch} rows")
        jobs = [self._make_job(req) for req in requests]
        for job in jobs:
            for ref, _ in job.adapters:
                self.load_adapter(ref)
        with self._step_lock:
            self.scheduler.bind_now(jobs)
            try:
                for job in jobs:
                    job.chunk = job.prefill_end - job.position  # one chunk: every position in one batch
                with torch.inference_mode():
                    return self._prefill(jobs, all_positions=True)  # type: ignore[return-value]
            finally:
                for job in jobs:
                    self.scheduler.unbind(job)

    def close(self) -> None:
        """Stop the loop; running and waiting requests fail with EngineClosed."""
        self.scheduler.close()
        self._thread.join()
        self.pool.close()
        self.scheduler.drain()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop (engine thread) ----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self.scheduler.closed and not self.scheduler.has_work():
                    self._cv.wait()
                if self.scheduler.closed:
                    return
            try:
                busy, failed = self._step()
            except Exception as e:  # a bug outside the forward: fail what is running, keep serving the rest
                log.exception("engine step failed")
                self.scheduler.fail_running(
                    HotswapError(f"engine step failed: {type(e).__name__}: {clip_message(str(e))}")
                )
                busy, failed = False, True
            self.health.after_step(failed)
            if not busy:
                with self._cv:
                    self._cv.wait(timeout=0.01)  # waiting for adapters to load

    def _step(self) -> tuple[bool, bool]:
        """One scheduler iteration: install, admit, prefill (a chunk of each prefilling row, within the step's
        budget), decode every row past its prefill. Returns (busy: any row ran, failed: a forward failed for no
        request's fault)."""
        failed = False
        with self._step_lock, torch.inference_mode():
            self.scheduler.admit()
            prefilling = self.scheduler.prefill_batch()
            running = [j for j in self.scheduler.running() if j not in prefilling]
            if prefilling:
                torch.set_num_threads(self._prefill_threads)
                jobs, logits, failed = run_isolated(prefilling, self._prefill, self.scheduler.fail)
                done = [(j, x) for j, x in zip(jobs, logits, strict=True) if x is not None]
                self._emit_all([j for j, _ in done], [x for _, x in done], prefilled=True)
            if running or prefilling:
                torch.set_num_threads(self._decode_threads)
                failed = self._decode() or failed
            if isinstance(self.runner.cache, PagedCache):
                pool = self.runner.cache.pool
                self.observer.kv_blocks(pool.used(), pool.available())
        return bool(prefilling or running), failed

    def _decode(self) -> bool:
        """One decode step over every running row; True if it failed for no request's fault."""
        active = self.scheduler.make_room(self.scheduler.drop_cancelled())
        if not active:
            return False
        self.observer.step(len(active))
        jobs, logits, failed = run_isolated(active, self._decode_logits, self.scheduler.fail)
        for job in jobs:
            job.position += 1
        self._emit_all(jobs, logits)
        return failed

    def _prefill(self, jobs: list[Job], all_positions: bool = False) -> list[torch.Tensor]:
        return prefill(self.runner, self.plan, self.kinds, jobs, all_positions)

    def _decode_logits(self, jobs: list[Job]) -> list[torch.Tensor]:
        full = len(jobs) == len(self.scheduler.running())  # a full batch decodes rows [0, n) in place
        return decode_step(self.runner, self.plan, self.kinds, jobs, full)

    def _emit_all(self, jobs: list[Job], logits: list[torch.Tensor], prefilled: bool = False) -> None:
        """Choose and emit each job's next token; ``prefilled``: the jobs just finished their prefill, and those whose
        logits are finite offer their prompt blocks to the prefix cache first."""
        if not jobs:
            return
        chosen = choose_isolated(jobs, logits, self.scheduler.fail)
        if prefilled:
            self.scheduler.prefilled([job for job, _ in chosen])
        now = time.perf_counter()
        with self._cv:
            for job, token in chosen:
                try:
                    self._emit(job, token, now)
                except Exception as e:  # e.g. the tokenizer on this row's text: this request's problem alone
                    log.exception("emitting a token failed")
                    error = f"{type(e).__name__}: {clip_message(str(e), 200)}"
                    self.scheduler.fail(job, HotswapError(f"request failed: {error}"))

    def _emit(self, job: Job, token: int, now: float) -> None:
        """Give ``job`` its next token, or end it: eos or a stop token (not part of the output), a stop string
        in its text (the token is, the text is cut), or its length."""
        t = now - job.submitted
        if not job.generated:
            job.timings.ttft_s = t
        req = job.req
        if not req.ignore_eos and (token in self.eos_ids or token in req.stop_token_ids):
            self.scheduler.finish(job, FinishReason.STOP)
            return
        job.generated.append(token)
        job.timings.token_times_s.append(t)
        if job.handle.push(token):
            self.scheduler.finish(job, FinishReason.STOP)
        elif len(job.generated) >= req.max_new_tokens:
            self.scheduler.finish(job, FinishReason.LENGTH)


def _as_list(value: object) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [int(value)]  # type: ignore[arg-type]
