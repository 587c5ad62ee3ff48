"""The serving configurations: the engine's, the gRPC server's and Ray scale-out's options, as frozen-ish
dataclasses validated in ``__post_init__`` (pure Python: importing them loads no model and no Ray).

Each field's ``metadata`` makes it a setting of ``hotswap serve`` (flag and ``--config`` key) and of Ray Serve's
``build_app``, by field name: ``help``, and where needed ``flag``, ``choices``, ``build_app`` and ``setting``
(see :mod:`hotswap.serve.settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotswap.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
APP = "hotswap"  # the Ray Serve application (gRPC metadata "application" when a cluster runs several)


@dataclass(frozen=True)
class EngineConfig:
    """The engine: batching, adapter slots and caches, device."""

    max_batch: int = field(default=32, metadata={"help": "rows decoded together"})
    max_resident: int = field(default=16, metadata={"help": "adapters resident in slots, ready for the batched ops"})
    max_seq_len: int = field(
        default=1024, metadata={"help": "tokens per row: prefix + virtual tokens + prompt + generated"}
    )
    max_queue: int = field(default=256, metadata={"help": "waiting requests; more are refused (RESOURCE_EXHAUSTED)"})
    max_adapters_per_request: int = field(default=8, metadata={"help": "length of a weighted adapter list"})
    max_rank: int = field(
        default=64,
        metadata={"help": "largest LoRA rank served; slot tables hold max_resident x (largest rank loaded)"},
    )
    host_cache_bytes: int = field(
        default=2 << 30, metadata={"help": "bytes of loaded adapters kept in host RAM beyond the resident ones"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "weights and activations", "choices": tuple(DTYPES)})
    # CPU intra-op threads for prefill (compute-bound: all cores) and decode (memory-bound: on small
    # batches extra threads add fork/join cost to every small op and barely speed up the big ones).
    prefill_threads: int = field(default=0, metadata={"help": "CPU threads for prefill; 0 = torch's default (all)"})
    decode_threads: int = field(default=1, metadata={"help": "CPU threads for decode steps"})

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_resident", "max_seq_len", "max_queue", "max_adapters_per_request", "max_rank"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("host_cache_bytes", "prefill_threads", "decode_threads"):  # 0: none / torch's default
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class ServerConfig:
    """The gRPC server."""

    base: Path = field(metadata={"help": "base checkpoint directory"})
    registry: str = field(metadata={"help": "registry URL or path"})
    # "build_app": False: not an arg of Ray Serve's application builder (the Serve config sets it itself)
    host: str = field(default="127.0.0.1", metadata={"help": "listen address", "build_app": False})
    port: int = field(
        default=50051,
        metadata={"help": "gRPC port (0 = any free port; with --ray: Ray Serve's gRPC proxy)", "build_app": False},
    )
    metrics_port: int | None = field(  # None: no /metrics endpoint
        default=9090, metadata={"help": "Prometheus /metrics port (0 = any free port)", "build_app": False}
    )
    auth: Path | None = field(
        default=None, metadata={"help": "tokens file (TOML, see README) mapping bearer tokens to tenants and roles"}
    )
    no_auth: bool = field(default=False, metadata={"help": "serve without authentication (instead of auth)"})
    tls_cert: Path | None = field(
        default=None, metadata={"help": "PEM certificate chain (with tls_key)", "build_app": False}
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key", "build_app": False})
    grace_seconds: float = field(
        default=30.0,
        metadata={"help": "seconds in-flight requests get to finish on shutdown", "flag": "grace", "build_app": False},
    )
    max_adapter_labels: int = field(
        default=100, metadata={"help": "adapter label values in metrics (the rest are 'other')"}
    )
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
    """Scale-out on Ray Serve (with --ray)."""

    app: str = field(  # clients send it as gRPC metadata "application" where a cluster runs several
        default=APP, metadata={"help": "the Ray Serve application's name", "setting": False}
    )
    replicas: int = field(default=2, metadata={"help": "engine replicas"})
    address: str | None = field(
        default=None,
        metadata={
            "help": "'auto' or ray://HOST:10001 to join a cluster (default: start one)",
            "flag": "ray_address",
            "build_app": False,
        },
    )
    grpc_port: int = field(  # hotswap serve --ray: its port; a Serve config: grpc_options.port
        default=9000,
        metadata={"help": "Ray Serve's gRPC proxy port (every node with a replica runs one)", "setting": False},
    )
    http_port: int = field(
        default=8000,
        metadata={
            "help": "Ray Serve's HTTP proxy port (hotswap serves nothing on it)",
            "flag": "ray_http_port",
            "build_app": False,
        },
    )
    replica_cpus: float = field(default=1.0, metadata={"help": "Ray CPUs reserved per replica"})
    # Ray's multiplexed cache: the engine's resident slots plus its host RAM tier; Ray routes an adapter to the
    # replica keeping it, and unloads the least recently used beyond this.
    adapters_per_replica: int = field(default=64, metadata={"help": "adapters a replica keeps (Ray's LRU cache)"})
    route_by_adapter: bool = field(
        default=True, metadata={"help": "route by the first adapter; off: Ray's adapter-blind routing (a baseline)"}
    )

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidArgument(f"replicas must be >= 1, got {self.replicas}")
        if self.replica_cpus < 0:
            raise InvalidArgument(f"replica_cpus must be >= 0, got {self.replica_cpus}")
        if self.adapters_per_replica < 1:
            raise InvalidArgument(f"adapters_per_replica must be >= 1, got {self.adapters_per_replica}")
