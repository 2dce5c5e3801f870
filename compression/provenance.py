"""What a variant was built from, as digests, and the cache that lets a run resume.

A variant's *inputs digest* covers the registered model (its spec and the source files of the
code it names), the data, the variant's full config, the code version of Gearbox's compression
package, and its parent variant's digest. A published variant whose digest is unchanged is not
rebuilt. While a run goes on, each finished build is kept in ``<repo>/<model>/.builds/``, and
the trained reference's weights in ``<repo>/<model>/.reference/``, so that an interrupted run
picks up where it stopped. Everything is stored as ONNX, numpy arrays (never pickled) and JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from gearbox.compression.repository import ModelRepository
from gearbox.compression.spec import DataSplits, ModelSpec, Split
from gearbox.compression.techniques import TechniqueConfig, config_to_params

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def code_version() -> str:
    """Gearbox's version and a digest of the compression package's sources: a change to any
    technique, export or training code gives a new version."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    try:
        release = version("gearbox")
    except PackageNotFoundError:
        release = "0+unknown"
    return f"{release}+src.{digest.hexdigest()[:12]}"


def _module_source(import_path: str | None) -> str:
    """Digest of the file defining the module an import path names ('' if none or built in)."""
    if import_path is None:
        return ""
    module_name = import_path.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return ""
    if found is None or found.origin is None or not os.path.isfile(found.origin):
        return ""
    return hashlib.sha256(Path(found.origin).read_bytes()).hexdigest()


def _split_digest(split: Split, digest: Any) -> None:
    for name in sorted(split.inputs):
        array = np.ascontiguousarray(split.inputs[name])
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    if split.labels is not None:
        labels = np.ascontiguousarray(split.labels)
        digest.update(f"labels:{labels.dtype}:{labels.shape}".encode())
        digest.update(labels.tobytes())


def reference_digest(spec: ModelSpec, data: DataSplits) -> str:
    """What the trained reference depends on: the spec, its code, the data, Gearbox's code."""
    digest = hashlib.sha256()
    fields = dataclasses.asdict(spec)
    fields.pop("source", None)
    fields.pop("description", None)
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    training = spec.training.augment if spec.training else None
    for path in (spec.model_factory, spec.student_factory, spec.data_provider, training):
        digest.update(_module_source(path).encode())
    for split in (data.train, data.calibration, data.heldout):
        _split_digest(split, digest)
    digest.update(code_version().encode())
    return digest.hexdigest()


def variant_digests(
    spec: ModelSpec, data: DataSplits, recipes: Sequence[TechniqueConfig]
) -> dict[str, str]:
    """Each recipe's inputs digest; recipes must come parents first (as resolved)."""
    base = reference_digest(spec, data)
    digests: dict[str, str] = {}
    for recipe in recipes:
        parent = digests.get(recipe.parent, "") if recipe.parent else ""
        payload = json.dumps(config_to_params(recipe), sort_keys=True, default=str)
        digests[recipe.name] = hashlib.sha256(f"{base}|{parent}|{payload}".encode()).hexdigest()
    return digests


@dataclasses.dataclass(frozen=True)
class CachedBuild:
    """A finished build kept aside until it is published."""

    onnx: bytes
    param_count: int
    details: Mapping[str, Any]
    storage_bytes: int | None
    quality: float | None
    outputs: np.ndarray
    node: str
    seconds: float


class BuildCache:
    """``<repo>/<model>/.builds/<digest>/`` and ``<repo>/<model>/.reference/<digest>.npz``."""

    def __init__(self, repository: ModelRepository, model: str) -> None:
        self.model_dir = repository.root / model

    def _build_dir(self, digest: str) -> Path:
        return self.model_dir / ".builds" / digest

    def load_build(self, digest: str) -> CachedBuild | None:
        where = self._build_dir(digest)
        try:
            meta = json.loads((where / "build.json").read_text())
            onnx_bytes = (where / "model.onnx").read_bytes()
            outputs = np.load(where / "outputs.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if hashlib.sha256(onnx_bytes).hexdigest() != meta.get("sha256"):
            return None
        return CachedBuild(
            onnx=onnx_bytes,
            param_count=int(meta["param_count"]),
            details=meta["details"],
            storage_bytes=meta["storage_bytes"],
            quality=meta["quality"],
            outputs=outputs,
            node=meta["node"],
            seconds=float(meta["seconds"]),
        )

    def save_build(self, digest: str, build: CachedBuild) -> None:
        """Written aside and renamed, so that a build is either whole in the cache or absent."""
        final = self._build_dir(digest)
        staging = final.parent / f".{digest}.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            (staging / "model.onnx").write_bytes(build.onnx)
            np.save(staging / "outputs.npy", build.outputs, allow_pickle=False)
            meta = {
                "sha256": hashlib.sha256(build.onnx).hexdigest(),
                "param_count": build.param_count,
                "details": build.details,
                "storage_bytes": build.storage_bytes,
                "quality": build.quality,
                "node": build.node,
                "seconds": build.seconds,
            }
            (staging / "build.json").write_text(json.dumps(meta, default=str))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def drop_build(self, digest: str) -> None:
        """Forget a published build; the cache's folder goes too once it is empty."""
        shutil.rmtree(self._build_dir(digest), ignore_errors=True)
        with contextlib.suppress(OSError):
            self._build_dir(digest).parent.rmdir()

    def load_reference(self, digest: str) -> dict[str, np.ndarray] | None:
        path = self.model_dir / ".reference" / f"{digest}.npz"
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError):
            return None

    def save_reference(self, digest: str, weights: Mapping[str, np.ndarray]) -> None:
        folder = self.model_dir / ".reference"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.npz"):
            stale.unlink()  # only the reference of the latest inputs is worth keeping
        staging = folder / f".{uuid.uuid4().hex}.npz"
        np.savez(staging, **weights)
        os.rename(staging, folder / f"{digest}.npz")
