"""The soak's workload: its configuration, and the adapters it serves (every family, built with the methods'
synthetic writers and published into a new local registry). The driver is :mod:`hotswap.bench.soak`."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hotswap import train
from hotswap.basemodel import fingerprint
from hotswap.registry import Registry
from hotswap.serve import EngineConfig

ALIAS_NAME, ALIAS, PUBLISHED = "tuned", "prod", "fresh"
ALIAS_REF = f"{ALIAS_NAME}:{ALIAS}"
EXPECTED = ("CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")  # traffic statuses a soak may see
FATAL = ("INTERNAL", "UNKNOWN")
MAX_REQUESTS_PER_CLIENT = 1_000_000  # the time bound ends the loops first; this one guards against a runaway
FAULTS = ("cancels", "deadlines", "loads", "unloads", "alias_moves", "publishes")  # injected, counted in the report


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 300.0  # traffic duration
    clients: int = 6  # client threads
    lora_adapters: int = 2  # plain LoRA adapters (besides tuned and fresh)
    rank: int = 4
    adapter_std: float = 0.2  # std of the random adapter weights (large enough to change the tiny base's output)
    prompts: int = 4  # distinct prompts (references are computed once per prompt, adapters and parameters)
    prompt_len: int = 8
    new_tokens: int = 12  # tokens of a normal request
    long_tokens: int = 160  # tokens of a deadline request (long enough for its deadline to pass first)
    deadline_s: float = 0.1
    request_timeout_s: float = 60.0  # deadline of every other call
    cancel_fraction: float = 0.15  # streams cancelled after 1-3 tokens
    deadline_fraction: float = 0.15
    stream_fraction: float = 0.5  # of the remaining requests
    sampled_fraction: float = 0.5  # seeded sampling (else greedy)
    seeds: int = 3  # distinct sampling seeds
    admin_every_s: float = 0.25
    alias_every_s: float = 0.5
    publish_every_s: float = 1.5
    max_publishes: int = 40
    max_pinned: int = 2
    max_batch: int = 8
    max_resident: int = 8  # fewer than the adapter versions served: slots are evicted and reused
    max_queue: int = 64
    threads: int = 1  # torch threads of the engines (1: a reliability run, cheap on a shared machine)
    warmup_s: float = 5.0  # RSS "before" is taken after this much traffic
    rss_bound_mib: float = 200.0  # allowed RSS growth from after warm-up to the end
    seed: int = 0
    device: str = "cpu"

    def engine(self, **kw: Any) -> EngineConfig:
        """The engine configuration of the server (``kw`` overrides, e.g. for the reference engine)."""
        extra = 32  # virtual tokens of the prefix / prompt adapters, with room to spare
        settings = dict(max_batch=self.max_batch, max_resident=self.max_resident, max_queue=self.max_queue,
                        max_seq_len=self.prompt_len + max(self.new_tokens, self.long_tokens) + extra,
                        device=self.device, prefill_threads=self.threads, decode_threads=self.threads)  # fmt: skip
        return EngineConfig(**(settings | kw))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SoakSetup:
    base: Path
    registry: Path
    loras: list[str]
    spares: list[Path]  # artifacts the publisher publishes as new versions of ``fresh``, in turn
    prompts: list[list[int]]

    @property
    def singles(self) -> list[str]:
        return [*self.loras, "dora", "bitfit", "prefix", "prompt", "bottleneck", "sparse"]

    @property
    def pairs(self) -> list[list[tuple[str, float]]]:
        """Weighted pairs of LoRA-family adapters (moving refs included)."""
        a, b = self.loras[0], self.loras[-1]
        return [[(ALIAS_REF, 1.0), (a, 0.5)], [(PUBLISHED, 0.75), ("dora", 0.5)], [(a, 0.5), (b, -0.5)],
                [("dora", 1.0), (ALIAS_REF, 0.75)]]  # fmt: skip


def prepare(base: Path, root: Path, config: SoakConfig) -> SoakSetup:
    """Adapters of every family built with the synthetic builders, published into a new registry under ``root``;
    ``tuned`` has versions 1 and 2 with alias ``prod`` on 1, ``fresh`` has version 1."""
    art = root / "artifacts"
    if config.lora_adapters < 2:
        raise ValueError("the soak needs at least 2 LoRA adapters (for weighted pairs)")
    loras = [f"lora-{i}" for i in range(config.lora_adapters)]
    tuned = [art / f"{ALIAS_NAME}-v{v}" for v in (1, 2)]
    spares = [art / f"{PUBLISHED}-{i}" for i in range(3)]
    lora = train.RandomLoraConfig(rank=config.rank, init_std=config.adapter_std)
    seeds = {p: config.seed * 1000 + i for i, p in enumerate([*(art / n for n in loras), *tuned, *spares])}
    train.random_loras(base, seeds, lora)
    std, s = config.adapter_std, config.seed * 1000 + 100
    built = {n: art / n for n in loras} | {
        "dora": train.random_lora(base, art / "dora", replace(lora, use_dora=True, seed=s)),
        "bitfit": train.random_bitfit(base, art / "bitfit", seed=s + 1, std=std),
        "prefix": train.random_prefix(base, art / "prefix", num_virtual_tokens=4, seed=s + 2),
        "prompt": train.random_prompt(base, art / "prompt", num_virtual_tokens=4, seed=s + 3),
        "bottleneck": train.random_bottlenecks(base, {art / "bottleneck": s + 4}, bottleneck_dim=8, std=std)[0],
        "sparse": train.random_sparse(base, art / "sparse", "fishmask", density=0.05, seed=s + 5, std=std),
    }
    registry = Registry(root / "registry")
    fp = fingerprint(base)
    for name, path in [*built.items(), *((ALIAS_NAME, p) for p in tuned), (PUBLISHED, spares[0])]:
        registry.publish(path, name, base_fingerprint=fp)
    registry.set_alias(ALIAS_NAME, ALIAS, 1)
    rng = random.Random(config.seed)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(config.prompt_len)] for _ in range(config.prompts)]
    return SoakSetup(base, root / "registry", loras, spares, prompts)
