"""``hotswap bench soak``: minutes of mixed traffic against a real gRPC server, with faults injected.

One driver for the benchmark scenario and ``tests/serve/test_soak.py``. :func:`prepare` publishes adapters of
every family (the synthetic builders) into a new local registry; :func:`run_soak` serves them from a
:class:`~hotswap.serve.api.server.Server` in this process (127.0.0.1, any free port) and, for ``seconds``, runs
client threads (base, each method, weighted LoRA-family pairs; greedy and seeded sampling; unary and
streaming; some streams cancelled after a few tokens, some requests with a short deadline), an admin thread
(hot Load, sometimes pinned, and Unload), an alias thread (``tuned:prod`` promoted to 2, rolled back to 1, ...)
and a publisher (new versions of ``fresh``). Then it checks: no INTERNAL/UNKNOWN status and no unexpected
one; each moving ref resolved to a version it pointed to while its request was in flight; each completed
answer equal to the solo run of its resolved versions (a new engine with one batch row, same base, registry
and threads), each cut-short one a prefix of one; RSS growth after warm-up within a bound; no leaked rows,
slots or RPCs. :attr:`SoakReport.problems` lists what failed (empty when all held).
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import random
import re
import resource
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from hotswap.basemodel import fingerprint
from hotswap.bench.common import Fixtures
from hotswap.bench.soak_setup import (
    ALIAS,
    ALIAS_NAME,
    ALIAS_REF,
    EXPECTED,
    FATAL,
    FAULTS,
    MAX_REQUESTS_PER_CLIENT,
    PUBLISHED,
    SoakConfig,
    SoakSetup,
    prepare,
)
from hotswap.client import AdapterArg, Client
from hotswap.errors import HotswapError, mapping_for
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.serve.api.config import ServerConfig
from hotswap.serve.api.server import Server

log = logging.getLogger(__name__)


class History:
    """Where a moving ref (an alias, or ``latest``) pointed, and when: (began, ended, version) per move, in
    ``time.monotonic`` seconds; the move became visible somewhere between began and ended."""

    def __init__(self, version: int) -> None:
        self.moves: list[tuple[float, float, int]] = [(-math.inf, -math.inf, version)]
        self._lock = threading.Lock()

    def move(self, write: Callable[[], int]) -> int:
        """Run ``write`` (it returns the version now pointed to) and record when it ran."""
        began = time.monotonic()
        version = write()
        with self._lock:
            self.moves.append((began, time.monotonic(), version))
        return version

    def allowed(self, start: float, end: float) -> set[int]:
        """Versions the ref pointed to at some instant of [start, end]: the one set before ``start``, and
        those of every move that overlaps the interval."""
        with self._lock:
            moves = list(self.moves)
        before = [v for _, ended, v in moves if ended <= start]
        return {before[-1]} | {v for began, ended, v in moves if began <= end and ended >= start}


@dataclass(frozen=True)
class Params:
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


Key = tuple[tuple[tuple[str, float], ...], Params, int]  # (exact adapters and weights, params, prompt)


@dataclass
class Call:
    kind: str  # unary | stream | cancel | deadline
    adapters: list[AdapterArg]  # as sent
    prompt: int  # index into SoakSetup.prompts
    params: Params
    submitted: float
    answered: float = 0.0
    status: str = "OK"  # or the gRPC status name
    tokens: list[int] = field(default_factory=list)
    resolved: list[tuple[str, float]] | None = None  # from the final response


@dataclass
class SoakReport:
    seconds: float
    requests: int = 0
    completed: int = 0
    tokens: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # client-side, per request
    server_statuses: dict[str, int] = field(default_factory=dict)  # hotswap_requests_total by status
    admin_errors: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)  # cancels, deadlines, loads, unloads, alias_moves, publishes
    resolved: dict[str, dict[str, int]] = field(default_factory=dict)  # moving ref -> exact ref -> answers
    answers_checked: int = 0
    prefixes_checked: int = 0
    mismatches: int = 0
    wrong_versions: int = 0
    rss_mib: dict[str, float] = field(default_factory=dict)  # start, before (after warm-up), peak, after
    rss_bound_mib: float = 0.0
    leaks: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_mib["after"] - self.rss_mib["before"]

    def row(self) -> dict[str, Any]:
        """One flat row of the benchmark table."""
        errors = {s: self.statuses.get(s, 0) for s in (*EXPECTED, *FATAL)} | {
            s: n for s, n in self.statuses.items() if s != "OK"
        }
        counts = ("requests", "completed", "answers_checked", "prefixes_checked", "mismatches", "wrong_versions")
        return {"label": f"soak {self.seconds / 60:.3g} min", "seconds": self.seconds,
                "tok_s": self.tokens / self.seconds,
                **{k: getattr(self, k) for k in counts}, **{f"err_{s.lower()}": n for s, n in errors.items()},
                **self.faults, **{f"rss_{k}_mib": v for k, v in self.rss_mib.items()},
                "rss_growth_mib": self.rss_growth_mib, "rss_bound_mib": self.rss_bound_mib,
                "leaks": sum(self.leaks.values()), "verdict": "FAIL" if self.problems else "pass",
                "problems": "; ".join(self.problems)[:500]}  # fmt: skip


def rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc; elsewhere the peak, from getrusage)."""
    status = Path("/proc/self/status")
    if status.exists() and (found := re.search(r"VmRSS:\s+(\d+) kB", status.read_text())):
        return int(found[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_name(err: HotswapError) -> str:
    """The gRPC status a client call ended with (the client re-raises it as ``err`` from the RpcError)."""
    cause = err.__context__
    if isinstance(cause, grpc.RpcError) and callable(getattr(cause, "code", None)):
        return cause.code().name  # type: ignore[attr-defined]
    return mapping_for(err).grpc_status


class _Soak:
    def __init__(self, setup: SoakSetup, config: SoakConfig, port: int) -> None:
        self.setup, self.cfg, self.target = setup, config, f"127.0.0.1:{port}"
        self.registry = Registry(setup.registry)
        self.alias = History(1)
        self.latest = History(1)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.faults: Counter[str] = Counter(dict.fromkeys(FAULTS, 0))
        self.admin_errors: Counter[str] = Counter()
        self.problems: list[str] = []

    def _count(self, fault: str) -> None:
        with self.lock:
            self.faults[fault] += 1

    def _problem(self, text: str) -> None:
        log.error("soak: %s", text)
        with self.lock:
            self.problems.append(text)

    # -- traffic -------------------------------------------------------------------------------------
    def clients(self, index: int) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 7919 + index)
        with Client(self.target, timeout=cfg.request_timeout_s) as client:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if self.stop.is_set():
                    return
                call = self._one(client, rng)
                with self.lock:
                    self.calls.append(call)

    def _pick(self, rng: random.Random) -> list[AdapterArg]:
        """The base 10%, a moving ref alone 20%, another single adapter 40%, a weighted pair 30% of the time."""
        groups = ([[]], [[ALIAS_REF], [PUBLISHED]], [[a] for a in self.setup.singles], self.setup.pairs)
        return list(rng.choice(rng.choices(groups, weights=(1, 2, 4, 3))[0]))

    def _one(self, client: Client, rng: random.Random) -> Call:
        cfg = self.cfg
        r = rng.random()
        kind = "cancel" if r < cfg.cancel_fraction else "deadline" if r < cfg.cancel_fraction + cfg.deadline_fraction \
            else "stream" if rng.random() < cfg.stream_fraction else "unary"  # fmt: skip
        n = cfg.long_tokens if kind == "deadline" else cfg.new_tokens
        sampled = rng.random() < cfg.sampled_fraction
        params = Params(n, 0.75, 20, 0.75, rng.randrange(cfg.seeds)) if sampled else Params(n)
        call = Call(kind, self._pick(rng), rng.randrange(len(self.setup.prompts)), params, time.monotonic())
        timeout = cfg.deadline_s if kind == "deadline" else None
        args = dict(adapters=call.adapters, prompt_ids=self.setup.prompts[call.prompt], ignore_eos=True,
                    timeout=timeout, **params.kwargs())  # fmt: skip
        try:
            if kind == "deadline":
                self._count("deadlines")
            if kind == "unary" or (kind == "deadline" and rng.random() < 0.5):
                done = client.generate(**args)
            else:
                stream = client.stream(**args)
                cancel_after = rng.randint(1, 3) if kind == "cancel" else None
                for chunk in stream:
                    call.tokens += chunk.token_ids
                    if cancel_after is not None and len(call.tokens) >= cancel_after:
                        cancel_after = None
                        stream.cancel()
                        self._count("cancels")
                done = stream.response
                if done is None:
                    raise AssertionError("a stream ended without its final response")
            call.tokens, call.resolved = done.token_ids, done.adapters
        except HotswapError as e:
            call.status = status_name(e)
        except Exception as e:  # a bug of the client or the driver: reported, never fatal to the soak
            call.status = f"CLIENT_{type(e).__name__}"
            self._problem(f"client call failed: {type(e).__name__}: {e}")
        call.answered = time.monotonic()
        return call

    # -- faults --------------------------------------------------------------------------------------
    def admin(self) -> None:
        rng = random.Random(self.cfg.seed * 7919 - 1)
        refs = [*self.setup.singles, ALIAS_REF, f"{ALIAS_NAME}@1", f"{ALIAS_NAME}@2", PUBLISHED]
        pinned: set[str] = set()
        with Client(self.target, timeout=self.cfg.request_timeout_s) as client:
            while not self.stop.wait(self.cfg.admin_every_s):
                if rng.random() < 0.5:
                    pin = len(pinned) < self.cfg.max_pinned and rng.random() < 0.25
                    loaded = self._admin("loads", client.load, rng.choice(refs), pin=pin)
                    if pin and loaded:
                        pinned.add(loaded[0])
                else:
                    ref = rng.choice(sorted(pinned) if pinned and rng.random() < 0.5 else refs)
                    pinned.discard(self._admin("unloads", client.unload, ref))
            for ref in sorted(pinned):  # leave nothing pinned
                self._admin("unloads", client.unload, ref)

    def _admin(self, fault: str, op: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One admin call; its error status is counted (None is returned then)."""
        self._count(fault)
        try:
            return op(*args, **kw)
        except HotswapError as e:
            with self.lock:
                self.admin_errors[status_name(e)] += 1
            return None

    def aliases(self) -> None:
        version = 1
        while not self.stop.wait(self.cfg.alias_every_s):
            version = 3 - version  # promote to 2, roll back to 1, ...
            self.alias.move(lambda v=version: self.registry.set_alias(ALIAS_NAME, ALIAS, v).version)
            self._count("alias_moves")

    def publisher(self) -> None:
        fp = fingerprint(self.setup.base)
        spares = itertools.cycle(self.setup.spares[1:] + self.setup.spares[:1])
        for _ in range(self.cfg.max_publishes):
            if self.stop.wait(self.cfg.publish_every_s):
                return
            path = next(spares)
            self.latest.move(lambda p=path: self.registry.publish(p, PUBLISHED, base_fingerprint=fp).version)
            self._count("publishes")

    # -- checks --------------------------------------------------------------------------------------
    def candidates(self, ref: str, call: Call) -> set[str]:
        """Exact refs ``ref`` may have resolved to for ``call``."""
        history = self.alias if ref == ALIAS_REF else self.latest if ref == PUBLISHED else None
        if history is None:
            return {ref if "@" in ref else f"{ref}@1"}
        name = ref.split(":")[0]
        return {f"{name}@{v}" for v in history.allowed(call.submitted, call.answered)}


def run_soak(setup: SoakSetup, config: SoakConfig) -> SoakReport:
    """Serve ``setup`` on 127.0.0.1 for ``config.seconds`` of traffic and faults; check and report."""
    server_config = ServerConfig(base=setup.base, registry=str(setup.registry), port=0, metrics_port=None,
                                 no_auth=True, grace_seconds=5, engine=config.engine())  # fmt: skip
    server = Server(server_config).start()
    report = SoakReport(seconds=config.seconds, rss_bound_mib=config.rss_bound_mib)
    try:
        soak = _Soak(setup, config, server.port)
        report.rss_mib["start"] = rss_mib()
        threads = [threading.Thread(target=soak.clients, args=(i,), name=f"soak-client-{i}", daemon=True)
                   for i in range(config.clients)]  # fmt: skip
        threads += [threading.Thread(target=fn, name=f"soak-{fn.__name__}", daemon=True)
                    for fn in (soak.admin, soak.aliases, soak.publisher)]  # fmt: skip
        start = time.monotonic()
        for t in threads:
            t.start()
        peak = 0.0
        while (left := start + config.seconds - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            if "before" not in report.rss_mib and time.monotonic() - start >= min(config.warmup_s, config.seconds / 2):
                report.rss_mib["before"] = rss_mib()
            peak = max(peak, rss_mib())
        soak.stop.set()
        for t in threads:
            t.join(timeout=config.request_timeout_s + 30)
            if t.is_alive():
                soak._problem(f"thread {t.name} did not finish")
        report.leaks = _wait_idle(server)
        gc.collect()
        report.rss_mib |= {"peak": max(peak, rss_mib()), "after": rss_mib()}
        report.server_statuses = _server_statuses(server)
    finally:
        server.stop(grace=1)
    _verify(soak, report)
    log.info("soak %s: %s", "failed" if report.problems else "passed", report.row())
    return report


def _wait_idle(server: Server, timeout: float = 30.0) -> dict[str, int]:
    """Poll until no request waits or runs, no RPC is in flight and no slot is held; what is left after
    ``timeout`` (all zero when nothing leaked)."""
    engine = server.engine
    assert engine is not None
    end = time.monotonic() + timeout
    while True:
        waiting, running = engine.counts()
        left = {"waiting_rows": waiting, "running_rows": running, "inflight_rpcs": server.inflight,
                "held_slots": sum(n != 0 for n in engine.pool.refcount),
                "draining_slots": len(engine.pool.draining)}  # fmt: skip
        if not any(left.values()) or time.monotonic() > end:
            return left
        time.sleep(0.02)


def _server_statuses(server: Server) -> dict[str, int]:
    """The server's own count of finished requests by status (``hotswap_requests_total``)."""
    out: Counter[str] = Counter()
    for sample in (x for family in server.metrics.registry.collect() for x in family.samples):
        if sample.name == "hotswap_requests_total":
            out[sample.labels["status"]] += int(sample.value)
    return dict(out)


def _verify(soak: _Soak, report: SoakReport) -> None:
    """Fill ``report`` from the calls: statuses, resolutions, answers against solo references, leaks, RSS."""
    cfg, calls = soak.cfg, soak.calls
    statuses = Counter(c.status for c in calls)
    report.requests, report.statuses = len(calls), dict(statuses)
    report.faults, report.admin_errors = dict(soak.faults), dict(soak.admin_errors)
    report.tokens = sum(len(c.tokens) for c in calls)
    checks: list[tuple[Call, list[Key]]] = []
    for call in calls:
        sent = [(a, 1.0) if isinstance(a, str) else (a[0], float(a[1])) for a in call.adapters]
        options = [soak.candidates(ref, call) for ref, _ in sent]
        if call.status == "OK":
            report.completed += 1
            resolved = tuple((ref, w) for ref, w in call.resolved or [])
            wrong = [r for (r, _), opts in zip(resolved, options, strict=False) if r not in opts]
            if len(resolved) != len(sent) or wrong:
                report.wrong_versions += 1
                soak._problem(f"{call.adapters} resolved to {resolved}, allowed {options}")
                continue
            for (sent_ref, _), (exact, _) in zip(sent, resolved, strict=True):
                if sent_ref in (ALIAS_REF, PUBLISHED):
                    by = report.resolved.setdefault(sent_ref, {})
                    by[exact] = by.get(exact, 0) + 1
            checks.append((call, [(resolved, call.params, call.prompt)]))
        elif call.tokens:  # cut short: a prefix of the solo run (at the normal length) of a version it may have used
            params = replace(call.params, max_new_tokens=cfg.new_tokens)
            combos = list(itertools.product(*options))[:4]
            keys = [(tuple(zip(c, (w for _, w in sent), strict=True)), params, call.prompt) for c in combos]
            checks.append((call, keys))
    refs = _solo_references(soak.setup, cfg, {key for _, keys in checks for key in keys})
    for call, keys in checks:
        n = len(call.tokens) if call.status == "OK" else min(len(call.tokens), cfg.new_tokens)
        if call.status == "OK":
            report.answers_checked += 1
        else:
            report.prefixes_checked += 1
        if not any(call.tokens[:n] == refs[key][:n] and (call.status != "OK" or n == len(refs[key])) for key in keys):
            report.mismatches += 1
            soak._problem(f"{call.kind} {call.adapters} {call.params}: {call.tokens} differs from the solo run")
    fatal = {s: n for s, n in statuses.items() if s != "OK" and s not in EXPECTED}
    fatal |= {f"server {s}": n for s, n in report.server_statuses.items() if s.upper() in FATAL}
    for what, counts in (("requests", fatal), ("admin calls", report.admin_errors)):
        if counts:
            soak._problem(f"{what} ended with unexpected statuses {counts}")
    if any(report.leaks.values()):
        soak._problem(f"leaked after the soak: {report.leaks}")
    if report.rss_growth_mib > cfg.rss_bound_mib:
        soak._problem(f"RSS grew {report.rss_growth_mib:.0f} MiB after warm-up (bound {cfg.rss_bound_mib:g})")
    if not report.answers_checked:
        soak._problem("no request completed")
    report.problems = list(soak.problems)


def _solo_references(setup: SoakSetup, cfg: SoakConfig, keys: set[Key]) -> dict[Key, list[int]]:
    """Token ids of each key run alone: a fresh engine with one batch row, same base, registry and threads."""
    with Engine(setup.base, setup.registry, cfg.engine(max_batch=1, max_queue=len(keys) + 1)) as engine:
        handles = {}
        for adapters, params, prompt in keys:
            request = Request(
                prompt_ids=setup.prompts[prompt], adapters=list(adapters), ignore_eos=True, **params.kwargs()
            )
            handles[adapters, params, prompt] = engine.submit(request)
        return {key: handle.result(timeout=600).token_ids for key, handle in handles.items()}


def soak(fx: Fixtures, adapter_counts: list[int]) -> list[dict[str, Any]]:
    """The ``soak`` scenario: ``fx.workload.soak_seconds`` of traffic on the workload's base (tiny by default)."""
    w = fx.workload
    config = SoakConfig(seconds=w.soak_seconds, lora_adapters=max(2, *adapter_counts), rank=w.rank,
                        adapter_std=0.2 if w.model == "tiny" else 0.02, prompt_len=w.prompt, new_tokens=w.new_tokens,
                        long_tokens=8 * w.new_tokens, max_batch=w.batch, seed=w.seed, device=w.device)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hotswap-soak-") as tmp:
        report = run_soak(prepare(fx.base, Path(tmp), config), config)
    return [report.row()]
