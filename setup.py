"""Build hook: the gRPC stubs of ``protos/samserve/v1/samserve.proto`` are generated at build time, never committed.

All metadata lives in pyproject.toml; this file only adds the stub generation (grpcio-tools, a build requirement):

- ``pip wheel .`` / ``pip install .``: ``build_py`` generates ``samserve/v1/`` (``__init__.py``, ``samserve_pb2.py``,
  ``samserve_pb2.pyi``, ``samserve_pb2_grpc.py``, and ``samserve.binpb``: the descriptor set with the proto's
  comments) into the build folder, and the wheel ships them;
- ``pip install -e .``: ``build_py`` generates them into ``service/samserve/v1/`` (git-ignored);
- ``python setup.py stubs`` (what ``make stubs`` runs in an editable checkout): the same, with the checkout's
  own grpcio-tools (the ``dev`` extra), without setuptools.

One function does it in every case: :func:`generate_stubs`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
PROTO = Path("samserve") / "v1" / "samserve.proto"
STUBS_PACKAGE = "samserve.v1"
DESCRIPTOR_SET = "samserve.binpb"
SOURCE_ROOT = ROOT / "service"  # where `samserve` lives in the checkout (pyproject's package-dir)
BUILD_BASE = ".setuptools-build"  # not setuptools' default `build/`: that is the project's own folder


def generate_stubs(out_root: Path) -> Path:
    """Run grpcio-tools' protoc on the proto: ``<out_root>/samserve/v1/`` gets samserve_pb2(.pyi),
    samserve_pb2_grpc and an ``__init__.py``. Returns that folder."""
    import google.api.annotations_pb2
    import grpc_tools
    from grpc_tools import protoc

    out_root = Path(out_root)
    package = out_root / PROTO.parent
    package.mkdir(parents=True, exist_ok=True)
    # Imports: google/api/*.proto ship with googleapis-common-protos, google/protobuf/*.proto with grpcio-tools.
    googleapis = Path(google.api.annotations_pb2.__file__).parents[2]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # The descriptor set with the proto's comments: the OpenAPI document's descriptions (samserve.transport.http.openapi).
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{googleapis}", f"-I{well_known}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", f"--pyi_out={out_root}",
            f"--descriptor_set_out={package / DESCRIPTOR_SET}", "--include_source_info", str(PROTO_ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_ROOT / PROTO}")
    init = package / "__init__.py"
    init.write_text(f'"""Generated from protos/{PROTO.as_posix()} at build time (setup.py); do not edit."""\n')
    return package


if __name__ == "__main__" and sys.argv[1:] == ["stubs"]:
    print(f"generated {generate_stubs(SOURCE_ROOT).relative_to(ROOT)}/ from protos/{PROTO.as_posix()}")
    sys.exit(0)

from setuptools import setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402
from setuptools.command.sdist import sdist  # noqa: E402


class BuildPyWithStubs(build_py):
    """``build_py`` that generates the stubs first: into a staging folder that becomes ``samserve.v1``'s package
    folder (wheels), or into the checkout (editable installs)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.editable_mode:
            staging = Path(self.get_finalized_command("build").build_temp) / "grpc-stubs"
            self.stubs_root = staging
            self.package_dir[STUBS_PACKAGE] = str(staging / PROTO.parent)
        else:
            self.stubs_root = SOURCE_ROOT

    def run(self) -> None:
        if self.stubs_root != SOURCE_ROOT:
            shutil.rmtree(self.stubs_root, ignore_errors=True)
        generate_stubs(self.stubs_root)
        self.stubs_generated = True
        super().run()

    def find_package_modules(self, package: str, package_dir: str) -> list:
        # Generated code is no source: before run() (sdist, egg_info's SOURCES.txt) the package has no modules.
        if package == STUBS_PACKAGE and not getattr(self, "stubs_generated", False):
            return []
        return super().find_package_modules(package, package_dir)


class SdistWithProto(sdist):
    """The sdist carries the proto (a wheel built from it generates the stubs again), never generated code."""

    def make_release_tree(self, base_dir: str, files: list) -> None:
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "protos" / PROTO
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROTO_ROOT / PROTO, target)


setup(
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto},
    options={"build": {"build_base": BUILD_BASE}},
)
