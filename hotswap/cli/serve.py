"""``hotswap serve`` (one gRPC server, or Ray Serve replicas with ``--ray``; with ``--http-port``, the
OpenAI-compatible HTTP API too).

Its flags and ``--config`` TOML keys are generated from the serving dataclasses (``ServerConfig`` with its
``EngineConfig``, ``RayOptions``) and :class:`ServeCommand` by field name (:mod:`hotswap.settings`):
a field's help is its metadata, its default the dataclass's; flags win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotswap.cli.common import AddCommand, add_setting_flags
from hotswap.errors import InvalidArgument
from hotswap.settings import Setting, build, normalize, settings_of

if TYPE_CHECKING:
    import threading

    from hotswap.serve.api.config import RayOptions, ServerConfig


@dataclass(frozen=True)
class ServeCommand:
    """hotswap serve."""

    ray: bool = field(default=False, metadata={"help": "serve on Ray Serve replicas (pip install 'hotswap[ray]')"})
    log_level: str = field(
        default="info", metadata={"help": "hotswap's log level", "choices": ("debug", "info", "warning", "error")}
    )
    ray_http_port: int | None = field(  # None: --http-port where given (serving the HTTP API), else RayOptions'
        default=None,
        metadata={"help": "with --ray and no --http-port: Ray Serve's HTTP proxy port, no HTTP API on it (8000)"},
    )


def settings() -> dict[str, Setting]:
    """Every setting of ``hotswap serve`` by field name (``registry`` is the global ``--registry``)."""
    from hotswap.serve.api.config import SERVE_CONFIGS

    return settings_of(ServeCommand, *SERVE_CONFIGS)


def _add_setting_flags(sp: argparse.ArgumentParser) -> None:
    """One flag per setting but ``registry`` (the global ``--registry``), grouped by dataclass."""
    add_setting_flags(sp, [s for s in settings().values() if s.name != "registry"])


def _values(args: argparse.Namespace, known: dict[str, Setting]) -> dict[str, Any]:
    """Settings by field name: flags over the --config file (the dataclasses' defaults fill in the rest)."""

    values: dict[str, Any] = {}
    if args.config:
        try:
            from_file = tomllib.loads(Path(args.config).read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"config {args.config} is not valid TOML: {e}") from None
        values = normalize(from_file, known, f"config {args.config}")
    values.update({name: getattr(args, name) for name in known if name != "registry" and hasattr(args, name)})
    if args.registry_given or "registry" not in values:
        values["registry"] = args.registry
    return values


def configs(args: argparse.Namespace) -> tuple[ServeCommand, ServerConfig, RayOptions]:
    """The command's, the server's and Ray's settings from the parsed flags and the --config file."""
    from hotswap.serve.api.config import RayOptions, ServerConfig

    values = _values(args, settings())
    if "base" not in values:
        raise InvalidArgument("serve needs --base PATH (or base = ... in --config)")
    command = build(ServeCommand, values, "serve")
    config, options = build(ServerConfig, values, "serve"), build(RayOptions, values, "serve")
    if config.http_port is not None and command.ray_http_port not in (None, config.http_port):
        raise InvalidArgument("--http-port is Ray Serve's HTTP proxy port with --ray: give it or --ray-http-port")
    proxy = config.http_port if config.http_port is not None else command.ray_http_port
    return command, config, options if proxy is None else dataclasses.replace(options, http_port=proxy)


def cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from hotswap.serve.api.server import Server

    command, config, options = configs(args)
    logging.getLogger("hotswap").setLevel(command.log_level.upper())
    stop = threading.Event()
    _stop_on_signals(stop)
    if command.ray:
        return _serve_ray(config, options, stop)
    server = Server(config).open()
    try:
        server.load()
    except BaseException:
        server.stop(grace=0)
        raise
    api = f", OpenAI API {_scheme(config)}://{config.host}:{server.http_port}/v1" if server.http_port else ""
    metrics = f", metrics http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"hotswap: serving {config.base} on {config.host}:{server.port}{api}{metrics}", flush=True)
    while not stop.wait(0.2):  # the signal handler runs between waits
        pass
    print(f"hotswap: shutting down (grace {config.grace_seconds:g} s)", flush=True)
    server.stop()
    return 0


def _scheme(config: ServerConfig) -> str:
    return "https" if config.tls_cert is not None else "http"


def _stop_on_signals(stop: threading.Event) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def _serve_ray(config: ServerConfig, options: RayOptions, stop: threading.Event) -> int:
    """``serve --ray``: deploy on Ray Serve, wait for SIGTERM/SIGINT, then delete the application."""
    try:
        from hotswap.serve.api import scaleout
    except ImportError as e:
        raise InvalidArgument(f"--ray needs the ray extra (pip install 'hotswap[ray]'): {e}") from None
    if config.tls_cert is not None:
        raise InvalidArgument("--ray serves through Ray Serve's gRPC proxy, which has no TLS: terminate TLS before it")
    if config.http_port == 0:
        raise InvalidArgument("--ray: Ray Serve's HTTP proxy needs a fixed --http-port (not 0)")
    if config.http_metrics:
        raise InvalidArgument("--http-metrics is for the single server; with --ray, Ray's metrics endpoint has them")
    options = dataclasses.replace(options, grpc_port=config.port)  # --port is the gRPC proxy's (--http-port its HTTP)
    scaleout.start(config, options)
    _stop_on_signals(stop)  # ray.init installed its own handlers
    api = f", OpenAI API http://{config.host}:{options.http_port}/v1" if config.http_port is not None else ""
    print(f"hotswap: serving {config.base} on Ray Serve, {options.replicas} replicas, "
          f"gRPC proxy port {options.grpc_port}{api}", flush=True)  # fmt: skip
    while not stop.wait(0.2):  # the signal handler runs between waits
        pass
    print("hotswap: shutting down (deleting the Ray Serve application)", flush=True)
    scaleout.stop()
    return 0


def register(add: AddCommand) -> None:
    help_ = "serve the base and the registry's adapters over gRPC and, with --http-port, the OpenAI API (until SIGTERM)"
    sp = add("serve", cmd_serve, help_)
    sp.add_argument(
        "--config",
        type=Path,
        help="TOML file with any of the settings below, keyed by name with underscores (max_batch = 64; a renamed "
        "flag notes its key); flags win",
    )
    sp.defer(_add_setting_flags)
