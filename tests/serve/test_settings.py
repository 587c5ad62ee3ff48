"""Serving settings by field name: ``hotswap serve``'s flags, its ``--config`` keys and Ray Serve's ``build_app``
args are the fields of ServerConfig, EngineConfig and RayOptions, with their help and their defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from hotswap.cli import build_parser, main
from hotswap.cli.serve import ServeCommand, configs, settings
from hotswap.errors import InvalidArgument
from hotswap.serve.api.config import APP_ARGS, RayOptions, ServerConfig
from hotswap.serve.engine.config import EngineConfig
from hotswap.settings import Setting, normalize, settings_of

CLASSES = (ServeCommand, ServerConfig, EngineConfig, RayOptions)


def _configs(*argv: str, registry: str | None = "reg") -> tuple[ServeCommand, ServerConfig, RayOptions]:
    args = build_parser().parse_args(["serve", *argv])
    args.registry, args.registry_given = registry or "default-reg", registry is not None
    return configs(args)


def _value(s: Setting) -> object:
    """A valid value other than the default, as TOML would hold it."""
    if s.kind is bool:
        return not s.default
    if s.choices:
        return s.choices[-1]
    return {int: 7, float: 2.5, str: "x", Path: "some/path"}[s.kind]


def _flag(s: Setting, value: object) -> list[str]:
    if s.kind is bool:
        return [f"--{s.flag}" if value else f"--no-{s.flag}"]
    return [f"--{s.flag}", str(value)]


def test_every_field_is_a_setting_with_help() -> None:
    """Each field of the dataclasses is a setting (nested ServerConfig.engine flattened), but the two Ray derives."""
    names = {f.name for cls in CLASSES for f in dataclasses.fields(cls)} - {"engine", "app", "grpc_port"}
    assert set(settings()) == names
    assert all(s.help for s in settings().values())
    assert set(APP_ARGS) == names - {"ray", "log_level", "host", "port", "metrics_port", "tls_cert", "tls_key",
                                     "grace_seconds", "address", "http_port", "http_metrics",
                                     "ray_http_port"}  # fmt: skip


def test_serve_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    for s in settings().values():
        flag = "--registry" if s.name == "registry" else f"--{s.flag}"  # the registry is the global option
        assert flag in out, flag
        if s.name != "registry":
            assert s.help in out, flag
    # defaults as the dataclasses say; where the flag is named otherwise, the key too
    assert "--grace GRACE seconds in-flight requests get to finish on shutdown (default: 30.0; key grace_seconds)" in (
        out
    )
    for flag in ("--ray-address", "--ray-http-port", "--ray", "--replicas", "--replica-cpus", "--log-level"):
        assert flag in out


def test_defaults_are_the_dataclasses() -> None:
    command, config, options = _configs("--base", "b", "--no-auth")
    assert command == ServeCommand()
    assert config == ServerConfig(base=Path("b"), registry="reg", no_auth=True)
    assert options == RayOptions()
    assert config.engine.max_queue == 256  # one default, the same for `hotswap serve` and Ray's build_app


def test_flags_and_toml_keys_are_the_field_names(tmp_path: Path) -> None:
    """Every setting given as a flag or as a TOML key (its field name) lands in its field."""
    known = {n: s for n, s in settings().items() if n not in ("registry", "no_auth")}  # no_auth: auth is given
    values = {name: _value(s) for name, s in known.items()}
    toml = tmp_path / "serve.toml"
    toml.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in {**values, "registry": "r2"}.items()))
    from_file = _configs("--config", str(toml), registry=None)
    from_flags = _configs(*[a for name, s in known.items() for a in _flag(s, values[name])], registry="r2")
    assert from_file == from_flags
    command, config, options = from_flags
    for name, s in known.items():
        owner = {ServeCommand: command, ServerConfig: config, EngineConfig: config.engine, RayOptions: options}
        expected = Path(values[name]) if s.kind is Path else values[name]
        assert getattr(owner[s.owner], name) == expected, name
    assert config.registry == "r2"


def _toml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')


def test_flags_win_over_the_file_and_old_keys_work(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text('base = "b"\nno_auth = true\ngrace = 5\nray_address = "auto"\nray_http_port = 8001\n')
    toml.write_text(toml.read_text() + 'registry = "r"\n')
    _, config, options = _configs("--config", str(toml), "--max-batch", "3", registry=None)
    assert (config.grace_seconds, options.address, options.http_port) == (5.0, "auto", 8001)
    assert (config.engine.max_batch, config.registry) == (3, "r")
    _, config, _ = _configs("--config", str(toml), "--grace", "1", registry="flag-reg")
    assert (config.grace_seconds, config.registry) == (1.0, "flag-reg")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batchh = 3", r"unknown keys \['max_batchh'\]; known: \["),
        ('max_batch = "32"', "max_batch must be an integer, got '32'"),
        ("no_auth = 1", "no_auth must be true or false, got 1"),
        ('dtype = "int8"', "dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
        ("grace = 1\ngrace_seconds = 2", "grace and grace_seconds are one setting"),
    ],
)
def test_bad_keys_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text(f'base = "b"\n{text}\n')
    assert main(["serve", "--config", str(toml), "--no-auth"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hotswap: error: config {toml}: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_build_app_args_are_settings() -> None:
    values = normalize({"base": "b", "registry": "r", "no_auth": True, "replica_cpus": 4, "max_queue": 9}, APP_ARGS,
                       "args")  # fmt: skip
    assert values["replica_cpus"] == 4.0 and isinstance(values["replica_cpus"], float)
    with pytest.raises(InvalidArgument, match="args: unknown keys"):
        normalize({"grace_seconds": 1}, APP_ARGS, "args")  # Ray Serve's own config sets these


def test_a_setting_is_defined_once() -> None:
    @dataclasses.dataclass
    class Twice:
        max_batch: int = dataclasses.field(default=1, metadata={"help": "again"})

    with pytest.raises(ValueError, match="max_batch"):
        settings_of(ServerConfig, Twice)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--prefill-threads", "-1"), ("--decode-threads", "-2"), ("--host-cache-bytes", "-5"), ("--max-batch", "0")],
)
def test_out_of_range_numbers_are_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    assert main(["serve", "--base", "b", "--no-auth", flag, value]) == 2
    err = capsys.readouterr().err
    field = flag.removeprefix("--").replace("-", "_")
    assert err.startswith("hotswap: error: ") and err.count("\n") == 1 and f"{field} must be >=" in err, err
