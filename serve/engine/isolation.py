"""Fault isolation: a failure that belongs to one request or one adapter fails that request only.

- A batched forward that raises is run again row by row, to find whose fault it is (:func:`run_isolated`).
- Choosing the next tokens falls back to row by row if it raises; a row whose logits are not finite ends
  alone (:func:`choose_isolated`).
- A step that fails for no request's fault backs off, and turns the engine unhealthy after ``UNHEALTHY_AFTER``
  in a row (:class:`StepHealth`), so a persistent fault never spins the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

import torch

from hotswap.errors import AdapterFault, HotswapError, clip_message
from hotswap.serve.engine.request import Job
from hotswap.serve.engine.sampling import choose_tokens
from hotswap.serve.engine.types import EngineObserver

log = logging.getLogger(__name__)

UNHEALTHY_AFTER = 3  # steps failing in a row (for no request's fault) before the engine reports unhealthy
MAX_BACKOFF_S = 2.0  # longest pause after a failed step

Run = Callable[[list[Job]], list[torch.Tensor]]  # one batched forward: next-token logits (V,) per job
Fail = Callable[[Job, HotswapError], None]  # end one request with an error, freeing its row


def _cause(error: BaseException) -> str:
    return f"{type(error).__name__}: {clip_message(str(error), 200)}"


def run_isolated(jobs: list[Job], run: Run, fail: Fail) -> tuple[list[Job], list[torch.Tensor], bool]:
    """``run(jobs)`` (one batched forward: logits per job); if it raises, find whose fault it is.

    Each job is run alone (a forward writes only its rows' cache at positions it rewrites, so running
    again is safe). A job that fails alone but runs without its adapters fails with AdapterFault; the
    others keep their logits. A job that fails even without adapters is no request's fault: it fails
    with an internal error, and if no job of the batch could run, the step counts as failed (back-off,
    health). Returns the jobs that ran, their logits, and whether the step failed."""
    try:
        return jobs, run(jobs), False
    except Exception as e:
        if not jobs:
            raise
        batch_error = e
        if len(jobs) > 1:
            log.warning("a batched forward of %d rows failed (%s); running them one by one", len(jobs), _cause(e))
    ok: list[Job] = []
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
        if job.adapters and _runs_without_adapters(job, run):
            refs = ", ".join(ref for ref, _ in job.adapters)
            log.warning("request with %s failed alone, and runs without its adapters: %s", refs, _cause(error))
            fail(job, AdapterFault(f"adapter {refs} failed in the forward ({_cause(error)}); other requests are "
                                   "unaffected"))  # fmt: skip
        else:
            if engine_fault is None:
                engine_fault = error
                log.error("engine forward failed", exc_info=error)
            fail(job, HotswapError(f"engine step failed: {_cause(error)}"))
    return ok, logits, engine_fault is not None and not ok


def _runs_without_adapters(job: Job, run: Run) -> bool:
    try:
        run([replace(job, adapters=[], slots=[])])
    except Exception:
        return False
    return True


def choose_isolated(jobs: list[Job], logits: list[torch.Tensor], fail: Fail) -> list[tuple[Job, int]]:
    """The next token of each job; a job whose sampling fails or whose logits are not finite ends alone (and is
    left out of the answer)."""
    try:
        chosen = choose_tokens(torch.stack(logits), [j.sampler for j in jobs])  # logits: (J, V)
    except Exception:  # one row's sampling failed: choose row by row, so only that row ends
        log.exception("choosing the next tokens of %d rows failed; choosing row by row", len(jobs))
        chosen = [_choose_alone(job, row, fail) for job, row in zip(jobs, logits, strict=True)]
    out = []
    for job, token in zip(jobs, chosen, strict=True):
        if token is not None:
            out.append((job, token))
        elif not job.handle.done:  # not already failed by _choose_alone
            fail(job, _non_finite(job))
    return out


def _choose_alone(job: Job, logits: torch.Tensor, fail: Fail) -> int | None:
    try:
        return choose_tokens(logits[None], [job.sampler])[0]
    except Exception as e:
        fail(job, HotswapError(f"sampling failed: {_cause(e)}"))
        return None


def _non_finite(job: Job) -> HotswapError:
    where = f"at generated token {len(job.generated)}"
    if not job.adapters:
        return HotswapError(f"the base model's logits became NaN or infinite {where}")
    used = ", ".join(f"{ref} (weight {w:g})" for ref, w in job.adapters)
    return AdapterFault(f"logits became NaN or infinite {where} with adapter {used}: numerically unstable "
                        "at this weight; other requests are unaffected")  # fmt: skip


class StepHealth:
    """Counts engine steps that failed for no request's fault; backs off after each, and reports unhealthy
    after ``UNHEALTHY_AFTER`` in a row (healthy again after the next good step)."""

    def __init__(self, observer: EngineObserver, lock: threading.Condition, closed: Callable[[], bool]) -> None:
        self.observer, self.lock, self.closed = observer, lock, closed
        self.healthy = True
        self.failed_steps = 0

    def after_step(self, failed: bool) -> None:
        if not failed:
            if self.failed_steps:
                log.info("engine steps succeed again after %d failed", self.failed_steps)
                self.failed_steps = 0
                self._set(True)
            return
        self.failed_steps += 1
        if self.failed_steps >= UNHEALTHY_AFTER:
            self._set(False)
        backoff = min(MAX_BACKOFF_S, 0.05 * 2 ** (self.failed_steps - 1))
        with self.lock:
            self.lock.wait_for(self.closed, timeout=backoff)

    def _set(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            log.log(logging.INFO if healthy else logging.ERROR, "engine %s", "healthy" if healthy else
                    f"unhealthy: {self.failed_steps} steps in a row failed")  # fmt: skip
            self.observer.health(healthy)
