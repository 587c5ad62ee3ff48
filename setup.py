"""Generates the gRPC stubs from proto/ whenever the package is built or installed (also editable), and finds the
packages under each folder pyproject.toml maps into the ``hotswap`` namespace (so a new method folder or serve
layer needs no edit here or there).

Everything else about the package lives in pyproject.toml; the stubs are build outputs (git-ignored), never
hand-edited sources.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "proto"


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        from grpc_tools import protoc  # a build requirement (pyproject [build-system])

        include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
        for proto in sorted(PROTO_ROOT.rglob("*.proto")):
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={ROOT}",
                f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}",
                str(proto),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        super().run()


def packages() -> list[str]:
    """Each mapped package (``hotswap.serve`` = ``serve/`` ...) and every package found under its folder."""
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = []
    for name, folder in mapped.items():
        nested = {f"{name}.{sub}" for sub in find_packages(str(ROOT / folder))}
        found += [name, *sorted(nested - set(mapped))]
    return found


setup(cmdclass={"build_py": BuildPyWithProtos}, packages=packages())
