"""Generates the gRPC stubs from proto/ whenever the package is built or installed (also editable).

Everything else about the package lives in pyproject.toml; this file only hooks protoc into build_py,
so the stubs are build outputs (git-ignored), never hand-edited sources.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
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


setup(cmdclass={"build_py": BuildPyWithProtos})
