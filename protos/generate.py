"""Regenerates the code of the contract: the Python stubs (with mypy-protobuf `.pyi` files) next to the .proto
files, and the TypeScript of clients/node (`buf generate`, buf.gen.yaml). Both are committed.

Usage: python protos/generate.py [--lang python|typescript ...] [--out DIR] [--ts-out DIR]
(default: both; the Python under protos/, the TypeScript under clients/node/src/gen)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

from common.tools import find_tool

PROTO_ROOT = Path(__file__).resolve().parent
REPO = PROTO_ROOT.parent
# buf.gen.yaml's plugin: protoc-gen-es from clients/node's devDependencies (`npm ci` there installs it).
TS_PLUGIN = REPO / "clients" / "node" / "node_modules" / ".bin" / "protoc-gen-es"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    """Writes `*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py` and `*_pb2_grpc.pyi` under `out`.

    Raises RuntimeError when protoc fails.
    """
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    # Make every generated directory an importable package.
    for directory in {p.parent for p in out.rglob("*_pb2.py")}:
        while directory != out:
            (directory / "__init__.py").touch()
            directory = directory.parent


def generate_typescript(base: Path = REPO) -> None:
    """Runs `buf generate` (buf.gen.yaml) with its outputs under `base`: clients/node/src/gen/... there.
    Offline: the project's buf and the local protoc-gen-es plugin, nothing from a remote registry.

    Raises RuntimeError when buf or the plugin is missing, or buf fails.
    """
    buf = find_tool("buf")
    if buf is None:
        raise RuntimeError("the buf CLI is missing: pip install -e '.[dev]' installs it beside the interpreter")
    if not TS_PLUGIN.exists():
        raise RuntimeError(f"{TS_PLUGIN.relative_to(REPO)} is missing: run `npm ci` in clients/node first")
    result = subprocess.run([buf, "generate", "--template", "buf.gen.yaml", "--output", str(base)], cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError("buf generate failed; see the messages above")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lang", action="append", choices=["python", "typescript"], help="default: both")
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="where the Python goes (default: protos/)")
    parser.add_argument("--ts-out", type=Path, default=REPO, help="base of buf.gen.yaml's outputs (default: the repo)")
    args = parser.parse_args()
    langs = args.lang or ["python", "typescript"]
    if "python" in langs:
        generate(args.out)
    if "typescript" in langs:
        generate_typescript(args.ts_out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
