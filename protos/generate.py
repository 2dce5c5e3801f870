"""Generate the Python gRPC stubs of every ``protos/*.proto`` (``make generate``).

The stubs (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) are committed under
``serving/grpc/generated/`` so that installing Gearbox needs no protoc. protoc writes
top-level imports (``import grpc_service_pb2 as ...``) between generated modules; they are
rewritten into package-relative ones so the stubs import as
``gearbox.serving.grpc.generated.grpc_service_pb2_grpc``.

Usage::

    python protos/generate.py [--out DIR]   # write the stubs (default: serving/grpc/generated)
    python protos/generate.py --check       # exit 1, naming them, if committed stubs are stale

The output depends on the grpcio-tools version (pinned in pyproject.toml): regenerate after
changing that pin.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
DEFAULT_OUT = REPO_ROOT / "serving" / "grpc" / "generated"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
STUB_PACKAGE = "gearbox.serving.grpc.generated"


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The ``.proto`` files to compile, sorted so the output is deterministic."""
    return sorted(proto_dir.glob("*.proto"))


def _is_generated(path: Path) -> bool:
    return path.is_file() and path.name.endswith(GENERATED_SUFFIXES)


def _make_imports_relative(text: str, local_modules: set[str]) -> str:
    """Rewrite ``import X_pb2 as Y`` of a sibling generated module into ``from . import``."""

    def replace(match: re.Match[str]) -> str:
        module, alias = match.group(1), match.group(2)
        if module not in local_modules:
            return match.group(0)
        return f"from . import {module} as {alias}"

    return re.sub(r"^import (\w+_pb2) as (\w+)$", replace, text, flags=re.MULTILINE)


def _use_private_pool(text: str) -> str:
    """Register the file in a module-private descriptor pool instead of the default one.

    tritonclient.grpc, KServe and MLServer ship stubs of the same ``inference`` package
    (tritonclient's also as ``grpc_service.proto``); in the process-wide default pool the
    second one imported fails with "duplicate file name" / "duplicate symbol". The wire
    format does not depend on the pool, so a private one loses nothing Gearbox uses (only
    pool-wide lookups such as gRPC server reflection would not see these messages).
    """
    default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    if text.count(default) != 1:
        raise SystemExit(f"unexpected protoc output: expected one line starting {default!r}")
    private = (
        "# Private pool: stubs of the same protocol in other packages (tritonclient.grpc) "
        "can be imported too.\n"
        "_POOL = _descriptor_pool.DescriptorPool()\n"
        "DESCRIPTOR = _POOL.AddSerializedFile("
    )
    return text.replace(default, private)


def _qualify_module_name(text: str, module: str) -> str:
    """Give the message classes their importable module name.

    protoc names the module after the .proto file alone (``grpc_service_pb2``); pickle, which
    Ray Serve's gRPC proxy uses to hand a request to a replica, finds a class by that name, so
    it must be the dotted name the stubs are imported under.
    """
    return text.replace(
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{module}', _globals)",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{STUB_PACKAGE}.{module}', _globals)",
    )


def _check_no_imports(protos: Sequence[Path]) -> None:
    # A private pool holds only its own file: an imported .proto would be missing from it.
    for proto in protos:
        text = proto.read_text(encoding="utf-8")
        if re.search(r"^\s*import\s", text, flags=re.MULTILINE):
            raise SystemExit(f"{proto.name}: imports are not supported (private descriptor pool)")


def generate(out_dir: Path = DEFAULT_OUT, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every proto of ``proto_dir`` into ``out_dir``; returns the files written."""
    from grpc_tools import protoc  # imported here so ``--help`` works without grpcio-tools

    protos = proto_files(proto_dir)
    if not protos:
        raise SystemExit(f"no .proto files under {proto_dir}")
    _check_no_imports(protos)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # so the stubs of a deleted .proto go too
        if _is_generated(old):
            old.unlink()
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see its messages above)")

    local_modules = {f"{p.stem}_pb2" for p in protos}
    written = sorted(p for p in out_dir.iterdir() if _is_generated(p))
    for path in written:
        if path.suffix == ".py":
            text = path.read_text(encoding="utf-8")
            fixed = _make_imports_relative(text, local_modules)
            if path.name.endswith("_pb2.py"):
                fixed = _use_private_pool(_qualify_module_name(fixed, path.stem))
            if fixed != text:
                path.write_text(fixed, encoding="utf-8")
    return written


def stale_files(out_dir: Path = DEFAULT_OUT, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Names of generated files in ``out_dir`` that are missing, outdated or left over."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp), proto_dir)}
    committed = (
        {p.name: p for p in out_dir.iterdir() if _is_generated(p)} if out_dir.is_dir() else {}
    )
    stale = [
        name
        for name, content in fresh.items()
        if name not in committed or committed[name].read_bytes() != content
    ]
    stale += [name for name in committed if name not in fresh]  # from a deleted .proto
    return sorted(stale)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if --out differs",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print(
                f"stale generated stubs in {args.out}: {', '.join(stale)}; run `make generate`",
                file=sys.stderr,
            )
            return 1
        print(f"generated stubs in {args.out} are up to date")
        return 0
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
