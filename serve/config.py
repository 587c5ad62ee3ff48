"""The serving configurations: the engine's, the gRPC server's and Ray scale-out's options, as frozen-ish
dataclasses validated in ``__post_init__`` (pure Python: importing them loads no model and no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotswap.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
APP = "hotswap"  # the Ray Serve application (gRPC metadata "application" when a cluster runs several)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # rows decoded together
    max_resident: int = 16  # adapter slots ready for the batched ops
    max_seq_len: int = 1024  # per row: prefix + virtual tokens + prompt + generated
    max_queue: int = 1024  # waiting requests; more -> CapacityExceeded
    max_adapters_per_request: int = 8  # length of a weighted adapter list
    max_rank: int = 64  # largest LoRA rank served; slot tables hold max_resident x (largest rank loaded)
    host_cache_bytes: int = 2 << 30  # loaded adapters kept in host RAM (beyond the resident ones)
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # CPU intra-op threads for prefill (compute-bound: all cores) and decode (memory-bound: on small
    # batches extra threads add fork/join cost to every small op and barely speed up the big ones).
    prefill_threads: int = 0  # 0 = torch's default (all cores)
    decode_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_resident", "max_seq_len", "max_queue", "max_adapters_per_request", "max_rank"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class ServerConfig:
    base: Path
    registry: str
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see Server.port)
    metrics_port: int | None = 9090  # None: no /metrics endpoint; 0: any free port
    auth: Path | None = None  # tokens file (serve/auth.py); None means no auth, which needs no_auth=True
    no_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_seconds: float = 30.0  # shutdown: how long in-flight requests may take to finish
    max_adapter_labels: int = 100
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if (self.auth is None) == (not self.no_auth):
            raise InvalidArgument("choose --auth TOKENS_FILE or, explicitly, --no-auth")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        if self.grace_seconds < 0:
            raise InvalidArgument(f"grace_seconds must be >= 0, got {self.grace_seconds}")


@dataclass(frozen=True)
class RayOptions:
    app: str = APP  # the Ray Serve application's name (clients send it as "application" if there are several)
    replicas: int = 2
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": join a cluster
    grpc_port: int = 9000  # Ray Serve's gRPC proxy (every node with a replica runs one)
    http_port: int = 8000  # Ray Serve always runs its HTTP proxy too (hotswap serves nothing on it)
    replica_cpus: float = 1.0  # Ray CPUs reserved per replica
    # Adapters a replica keeps (Ray's multiplexed cache: the engine's resident slots plus its host RAM tier);
    # Ray routes an adapter to the replica keeping it, and unloads the least recently used beyond this.
    adapters_per_replica: int = 64
    route_by_adapter: bool = True  # False: Ray's adapter-blind routing (each engine loads on demand): a baseline

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidArgument(f"replicas must be >= 1, got {self.replicas}")
        if self.replica_cpus < 0:
            raise InvalidArgument(f"replica_cpus must be >= 0, got {self.replica_cpus}")
        if self.adapters_per_replica < 1:
            raise InvalidArgument(f"adapters_per_replica must be >= 1, got {self.adapters_per_replica}")
