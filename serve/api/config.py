"""The server's configurations: the gRPC/HTTP server's (holding the engine's) and Ray scale-out's options, as frozen-ish
dataclasses validated in ``__post_init__`` (pure Python: importing them loads no model and no Ray).

Each field's ``metadata`` makes it a setting of ``hotswap serve`` (flag and ``--config`` key) and of Ray Serve's
``build_app``, by field name: ``help``, and where needed ``flag``, ``choices``, ``build_app`` and ``setting``
(see :mod:`hotswap.settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hotswap.errors import InvalidArgument
from hotswap.serve.engine.config import EngineConfig
from hotswap.settings import settings_of

APP = "hotswap"  # the Ray Serve application (gRPC metadata "application" when a cluster runs several)


@dataclass
class ServerConfig:
    """The server: gRPC, and the OpenAI-compatible HTTP API."""

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
    http_port: int | None = field(  # None: no HTTP API (with --ray: Ray Serve's HTTP proxy on RayOptions.http_port)
        default=None,
        metadata={
            "help": "OpenAI-compatible HTTP API port (0 = any free port; with --ray: on Ray Serve's HTTP proxy)",
            "build_app": False,
        },
    )
    http_metrics: bool = field(
        default=False, metadata={"help": "also serve Prometheus /metrics on the HTTP API's port", "build_app": False}
    )
    served_model_name: str | None = field(  # None: the base directory's name
        default=None, metadata={"help": "the base model's id in the HTTP API (default: its directory's name)"}
    )
    auth: Path | None = field(
        default=None, metadata={"help": "bearer tokens file (TOML, see docs/api.md): tokens to tenants and roles"}
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
        if self.http_metrics and self.http_port is None:
            raise InvalidArgument("http_metrics serves /metrics on the HTTP API's port: give http_port too")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise InvalidArgument("served_model_name must not be empty")

    @property
    def model_name(self) -> str:
        """The base model's id in the HTTP API."""
        return self.served_model_name or Path(self.base).name


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
    http_port: int = field(  # hotswap serve --ray: --http-port where given; a Serve config: http_options.port
        default=8000, metadata={"help": "Ray Serve's HTTP proxy port", "setting": False}
    )
    replica_cpus: float = field(default=1.0, metadata={"help": "Ray CPUs reserved per replica"})
    ingress_replicas: int = field(
        default=1, metadata={"help": "replicas of the HTTP API's ingress (light, no CPU reserved: they relay)"}
    )
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
        if self.ingress_replicas < 1:
            raise InvalidArgument(f"ingress_replicas must be >= 1, got {self.ingress_replicas}")
        if self.adapters_per_replica < 1:
            raise InvalidArgument(f"adapters_per_replica must be >= 1, got {self.adapters_per_replica}")


SERVE_CONFIGS = (ServerConfig, RayOptions)  # the serving dataclasses (ServerConfig holds the EngineConfig)
# Ray Serve's build_app takes the settings a Serve config does not set itself.
APP_ARGS = {name: s for name, s in settings_of(*SERVE_CONFIGS).items() if s.build_app}
