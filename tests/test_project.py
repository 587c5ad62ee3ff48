"""The project's shape: the installed layout is namespaced, the Dockerfile parses and ships every package."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from hotswap.errors import InvalidArgument

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_parses_and_copies_every_package() -> None:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    instructions = [i["instruction"] for i in parser.structure if i["instruction"] != "COMMENT"]
    assert instructions[0] in ("FROM", "ARG")
    assert parser.baseimage.startswith("python:3.11")
    copied = {src for i in parser.structure if i["instruction"] == "COPY" for src in i["value"].split()[:-1]}
    for directory in PYPROJECT["tool"]["setuptools"]["package-dir"].values():
        assert directory in copied, f"Dockerfile does not COPY {directory}/"
    assert {"proto", "setup.py"} <= copied  # the build generates the gRPC stubs
    entry = next(i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT")
    assert '"hotswap"' in entry
    cmd = next(i["value"] for i in parser.structure if i["instruction"] == "CMD")
    assert '"serve"' in cmd and "/etc/hotswap/serve.toml" in cmd
    health = next(i["value"] for i in parser.structure if i["instruction"] == "HEALTHCHECK")
    assert '"health"' in health
    exposed = next(i["value"] for i in parser.structure if i["instruction"] == "EXPOSE").split()
    config = tomllib.loads((ROOT / "deploy" / "serve.toml").read_text())
    assert {str(config["port"]), str(config["metrics_port"])} <= set(exposed)


def test_rayservice_manifest_matches_the_image_and_the_server() -> None:
    """deploy/rayservice.yaml parses, runs the Dockerfile's image with the ports it exposes, and its Serve
    config is what ``hotswap serve --ray`` deploys (servicers, gRPC port, an application that builds)."""
    yaml = pytest.importorskip("yaml")
    scaleout = pytest.importorskip("hotswap.serve.api.scaleout")
    from ray.serve import Application

    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    containers = [c for pod in pods for c in pod["template"]["spec"]["containers"]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    exposed = set(next(i["value"] for i in parser.structure if i["instruction"] == "EXPOSE").split())
    assert "docker build -t hotswap ." in dockerfile and "ARG EXTRAS=ray" in dockerfile
    for container in containers:
        assert container["image"] == "hotswap:latest"
        ports = {str(p["containerPort"]) for p in container["ports"]}
        assert "9000" in ports and ports - {"6379", "8265", "10001"} <= exposed
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    grpc = serve_config["grpc_options"]
    assert grpc["port"] == scaleout.RayOptions().grpc_port == 9000
    assert grpc["grpc_servicer_functions"] == scaleout.SERVICER_FUNCTIONS
    (app,) = serve_config["applications"]
    assert app["name"] == scaleout.APP
    module, attr = app["import_path"].split(":")
    assert module == scaleout.__name__ and getattr(scaleout, attr) is scaleout.build_app
    assert isinstance(scaleout.build_app(app["args"]), Application)
    with pytest.raises(InvalidArgument, match=r"hotswap application args: unknown keys \['max_batchh'\]"):
        scaleout.build_app({**app["args"], "max_batchh": 3})
    with pytest.raises(InvalidArgument, match=r"unknown keys \['port'\]"):  # the Serve config's grpc_options
        scaleout.build_app({**app["args"], "port": 9001})


def test_shipped_serve_config_is_accepted() -> None:
    """deploy/serve.toml (the image's settings) builds the server's configuration, key by key."""
    from hotswap.cli import build_parser
    from hotswap.cli.serve import configs

    args = build_parser().parse_args(["serve", "--config", str(ROOT / "deploy" / "serve.toml")])
    args.registry, args.registry_given = "unused", False
    command, config, _ = configs(args)
    shipped = tomllib.loads((ROOT / "deploy" / "serve.toml").read_text())
    assert str(config.base) == shipped["base"] and config.registry == shipped["registry"]
    assert (config.port, config.metrics_port, config.engine.max_queue) == (50051, 9090, shipped["max_queue"])
    assert not command.ray


@pytest.mark.slow
def test_wheel_installs_only_under_the_hotswap_namespace(tmp_path: Path) -> None:
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hotswap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"hotswap"}
    for module in (
        "hotswap/registry/refs.py",
        "hotswap/train/trainer.py",
        "hotswap/methods/ia3/kind.py",  # every method folder is a package of the wheel, found by setup.py
        "hotswap/methods/vera/kind.py",
        "hotswap/methods/api/kinds.py",
        "hotswap/cli/serve.py",
        "hotswap/serve/api/server.py",  # and every serve layer
        "hotswap/serve/engine/engine.py",
        "hotswap/serve/model/runner.py",
        "hotswap/client.py",
        "hotswap/v1/hotswap_pb2.py",  # generated from proto/ by the build
        "hotswap/v1/hotswap_pb2_grpc.py",
    ):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hotswap = hotswap.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_single_server_mode_never_imports_ray() -> None:
    code = "import sys, hotswap.cli, hotswap.serve.api.server, hotswap.client; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
