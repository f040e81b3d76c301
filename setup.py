"""Build hook: generate the gRPC/protobuf modules from proto/ at install time.

The generated files are never committed. ``build_py`` runs for wheels and for
editable installs (where setuptools skips copying but still calls ``run``), so
both get the same modules, written next to the package sources.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = "detector/_proto/phasewatch/v1/detector.proto"


def generate_proto() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject build-system)

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{include}",
        "-Idetector/_proto=proto",
        "--python_out=.",
        "--grpc_python_out=.",
        "--pyi_out=.",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


class BuildWithProto(build_py):
    def run(self) -> None:
        import os

        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            generate_proto()
        finally:
            os.chdir(cwd)
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
