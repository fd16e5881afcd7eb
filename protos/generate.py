"""Regenerates the Python stubs of the .proto files in this folder (``python -m protos.generate``).

Runs ``grpc_tools.protoc`` into a temporary folder, then rewrites what it produced so the stubs work
as modules of the ``protos`` package:

- ``import x_pb2 as y`` becomes ``from protos import x_pb2 as y`` (protoc writes top-level imports);
- descriptors go into `protos.POOL` instead of protobuf's default pool (see `protos` for why);
- the ``.pyi`` stubs open with ``# ruff: noqa`` (generated code, not held to our style).

Files are written only when their content changes, so ``make build`` stays fast and leaves mtimes
alone. ``--check`` writes nothing and exits 1 when the committed stubs differ from what would be
generated (a .proto edited without regenerating, or a different grpcio-tools version).
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent

#: The .proto files compiled, in dependency order.
PROTOS: tuple[str, ...] = ("model_config.proto", "grpc_service.proto")

#: The .proto files that declare a service (these also get a ``_pb2_grpc.py``).
SERVICES: frozenset[str] = frozenset({"grpc_service.proto"})

#: Names of every generated file this script owns, relative to PROTO_DIR.
GENERATED_SUFFIXES: tuple[str, ...] = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_POOL_IMPORT = "from protos import POOL as _POOL\n"
_INSERTION_POINT = "# @@protoc_insertion_point(imports)\n"


class GenerateError(RuntimeError):
    """protoc failed, or its output no longer has the shape the rewrites expect."""


def _stems() -> list[str]:
    return [Path(p).stem for p in PROTOS]


def _rewrite_imports(text: str) -> str:
    """Turn protoc's top-level imports of our own modules into package-relative ones."""
    for stem in _stems():
        text = re.sub(
            rf"^import {stem}_pb2 as (\w+)$",
            rf"from protos import {stem}_pb2 as \1",
            text,
            flags=re.MULTILINE,
        )
    return text


def _rewrite_pb2(name: str, text: str) -> str:
    text = _rewrite_imports(text)
    if text.count("_descriptor_pool.Default().AddSerializedFile(") != 1 or _INSERTION_POINT not in text:
        raise GenerateError(f"{name}: unexpected protoc output; update protos/generate.py")
    text = text.replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")
    return text.replace(_INSERTION_POINT, _INSERTION_POINT + _POOL_IMPORT, 1)


def _rewrite(name: str, text: str) -> str:
    if name.endswith("_pb2.py"):
        return _rewrite_pb2(name, text)
    if name.endswith(".pyi"):
        return "# ruff: noqa\n" + _rewrite_imports(text)
    return _rewrite_imports(text)


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # a dev dependency: imported only when generating

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", *args])
    if code != 0:
        raise GenerateError(f"protoc failed with exit code {code} on {args[-1]}")


def render() -> dict[str, str]:
    """Compile every .proto and return ``{file name: rewritten content}`` of the stubs."""
    with tempfile.TemporaryDirectory(prefix="protos-") as tmp:
        for proto in PROTOS:
            args = [f"--python_out={tmp}", f"--pyi_out={tmp}"]
            if proto in SERVICES:
                args.append(f"--grpc_python_out={tmp}")
            _protoc([*args, proto])
        out: dict[str, str] = {}
        for path in sorted(Path(tmp).iterdir()):
            out[path.name] = _rewrite(path.name, path.read_text(encoding="utf-8"))
    expected = {f"{stem}{suffix}" for stem in _stems() for suffix in GENERATED_SUFFIXES[:2]}
    expected |= {f"{Path(p).stem}_pb2_grpc.py" for p in SERVICES}
    if set(out) != expected:
        raise GenerateError(f"protoc produced {sorted(out)}, expected {sorted(expected)}")
    return out


def stale(rendered: dict[str, str], directory: Path = PROTO_DIR) -> list[str]:
    """Names of the generated files in ``directory`` that are missing, differ, or are left over."""
    bad = []
    for name, text in rendered.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            bad.append(name)
    for path in directory.iterdir():
        if path.name.endswith(GENERATED_SUFFIXES) and path.name not in rendered:
            bad.append(path.name)
    return sorted(bad)


def write(rendered: dict[str, str], directory: Path = PROTO_DIR) -> list[str]:
    """Write the files whose content changed and remove left-over stubs; returns the names touched."""
    touched = stale(rendered, directory)
    for name in touched:
        path = directory / name
        if name in rendered:
            path.write_text(rendered[name], encoding="utf-8")
        else:
            path.unlink()
    return touched


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate (default) or ``--check``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when the stubs are out of date"
    )
    args = parser.parse_args(argv)
    try:
        rendered = render()
    except GenerateError as exc:
        print(f"protos.generate: {exc}", file=sys.stderr)
        return 2
    if args.check:
        bad = stale(rendered)
        if bad:
            print(
                f"protos.generate: out of date: {', '.join(bad)}; run `python -m protos.generate`",
                file=sys.stderr,
            )
            return 1
        return 0
    for name in write(rendered):
        print(f"protos.generate: wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
