"""The model repository: ``<repo>/<model>/model.json`` and ``<repo>/<model>/<variant>/``.

Writes are atomic: a variant is assembled in a hidden staging directory beside its final place
and renamed into it, so a reader sees either no variant or a complete one. Names starting with
``.`` are staging or trash and never listed. Artifacts are checked against their sha256 on read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

from gearbox.compression.errors import (
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    RepositoryError,
)
from gearbox.compression.signature import Signature, TextInput
from gearbox.compression.spec import ModelSpec

MODEL_FILE = "model.json"
MANIFEST_FILE = "variant.json"
ARTIFACT_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"

VariantStatus = Literal["ready", "rejected"]


class LatencyFigures(TypedDict):
    """Milliseconds of one ``session.run`` call."""

    p50: float
    p95: float


class BatchLatency(TypedDict):
    """One batch size's figures on one device class.

    ``p50``/``p95`` are the figures every reader knows; for a model whose inputs have a length
    (token sequences) they are those at the default length, and ``tokens`` holds the same per
    profiled length, keyed by the token count as a string (JSON).
    """

    p50: float
    p95: float
    tokens: NotRequired[dict[str, LatencyFigures]]


LatencyProfile = dict[str, dict[str, BatchLatency]]
"""``{device_class: {batch_size: BatchLatency}}``, batch sizes as strings (JSON)."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(name: str, what: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise InvalidArgumentError(f"invalid {what} name '{name}'")


@dataclass(frozen=True)
class ModelRecord:
    """``model.json``: what every variant of a model shares."""

    name: str
    signature: Signature
    task: str
    metric: str
    reference_variant: str
    spec: str | None = None
    model_factory: str | None = None
    description: str = ""
    created_at: str = field(default_factory=utc_now)
    text: TextInput | None = None
    tokenizer_sha256: str | None = None
    """sha256 of the text model's ``tokenizer.json`` beside ``model.json``."""

    @classmethod
    def for_spec(
        cls, spec: ModelSpec, reference_variant: str, tokenizer: bytes | None = None
    ) -> ModelRecord:
        return cls(
            name=spec.name,
            signature=spec.signature,
            task=spec.task,
            metric=spec.metric,
            reference_variant=reference_variant,
            spec=spec.source,
            model_factory=spec.model_factory,
            description=spec.description,
            text=spec.text,
            tokenizer_sha256=None if tokenizer is None else sha256_hex(tokenizer),
        )

    def to_json(self) -> dict[str, Any]:
        text = (
            {}
            if self.text is None
            else {"text": {**self.text.to_json(), "tokenizer_sha256": self.tokenizer_sha256}}
        )
        return {
            "name": self.name,
            **self.signature.to_json(),
            "task": self.task,
            "metric": self.metric,
            "reference_variant": self.reference_variant,
            "spec": self.spec,
            "model_factory": self.model_factory,
            "description": self.description,
            "created_at": self.created_at,
            **text,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelRecord:
        text = data.get("text")
        if text is not None and not isinstance(text, Mapping):
            raise InvalidArgumentError("'text' must be an object")
        return cls(
            name=data["name"],
            signature=Signature.from_json(data),
            task=data["task"],
            metric=data["metric"],
            reference_variant=data["reference_variant"],
            spec=data.get("spec"),
            model_factory=data.get("model_factory"),
            description=data.get("description", ""),
            created_at=data.get("created_at", ""),
            text=None if text is None else TextInput.from_json(text),
            tokenizer_sha256=None if text is None else text["tokenizer_sha256"],
        )


@dataclass(frozen=True)
class Quality:
    metric: str
    value: float
    reference: float
    agreement: float
    details: Mapping[str, float] = field(default_factory=dict)
    """Figures beside the score, written as further keys (embeddings: ``min_cosine``,
    ``neighbour_agreement``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": self.value,
            "reference": self.reference,
            "agreement": self.agreement,
            **self.details,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Quality:
        core = {"metric", "value", "reference", "agreement"}
        return cls(
            metric=str(data["metric"]),
            value=float(data["value"]),
            reference=float(data["reference"]),
            agreement=float(data["agreement"]),
            details={key: float(value) for key, value in data.items() if key not in core},
        )


@dataclass(frozen=True)
class VariantManifest:
    """``variant.json``: one published variant, exactly the keys of DESIGN.md §4 plus extras."""

    model: str
    variant: str
    technique: str
    params: Mapping[str, Any]
    parent: str | None
    status: VariantStatus
    reason: str | None
    sha256: str
    size_bytes: int
    param_count: int
    quality: Quality
    latency_ms: Mapping[str, Mapping[str, BatchLatency]]
    created_at: str = field(default_factory=utc_now)
    build: Mapping[str, Any] = field(default_factory=dict)
    """Provenance: the Ray node that built the variant, how long it took, the code version and
    the digest of everything it was built from."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """What the technique did and measured (per step for a composed recipe)."""
    storage_bytes: int | None = None
    """Bytes of the compressed storage form (codebook + packed indices, sparse encoding) where
    it differs from the served artifact; None: ``size_bytes``."""

    @property
    def stored_size(self) -> int:
        return self.size_bytes if self.storage_bytes is None else self.storage_bytes

    @property
    def is_ready(self) -> bool:
        return self.status == "ready"

    def latency_at(
        self, device_class: str, batch: int, tokens: int | None = None
    ) -> LatencyFigures | None:
        """p50/p95 (ms) of one call of ``batch`` rows on ``device_class``, or None where that
        device class or batch size was not profiled.

        ``tokens``, the length of the call's token sequences, matters only for a model profiled
        per length (a ``tokens`` level): between two profiled lengths the figures are
        interpolated linearly; below the shortest they are the shortest's; beyond the longest
        they follow the line through the two longest, never below the longest's figures (a
        transformer's time keeps growing with its input, so the longest's figures alone would
        promise too little). Without ``tokens``, or for a model whose cost does not depend on
        length, they are the batch size's own figures (for a length-dependent model: those at
        the default length).
        """
        if tokens is not None and tokens < 1:
            raise InvalidArgumentError(f"a token count must be at least 1, got {tokens}")
        figures = self.latency_ms.get(device_class, {}).get(str(batch))
        if figures is None:
            return None
        by_tokens = figures.get("tokens")
        if tokens is None or not by_tokens:
            return LatencyFigures(p50=figures["p50"], p95=figures["p95"])
        return _figures_at_length(by_tokens, tokens)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "variant": self.variant,
            "technique": self.technique,
            "params": dict(self.params),
            "parent": self.parent,
            "status": self.status,
            "reason": self.reason,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "storage_bytes": self.stored_size,
            "param_count": self.param_count,
            "quality": self.quality.to_json(),
            "latency_ms": {
                device: {batch: _batch_latency_json(figures) for batch, figures in by_batch.items()}
                for device, by_batch in self.latency_ms.items()
            },
            "created_at": self.created_at,
            "build": dict(self.build),
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VariantManifest:
        try:
            return cls(
                model=data["model"],
                variant=data["variant"],
                technique=data["technique"],
                params=data.get("params", {}),
                parent=data.get("parent"),
                status=data["status"],
                reason=data.get("reason"),
                sha256=data["sha256"],
                size_bytes=int(data["size_bytes"]),
                param_count=int(data["param_count"]),
                quality=Quality.from_json(data["quality"]),
                latency_ms=_parse_latency(data.get("latency_ms", {})),
                created_at=data.get("created_at", ""),
                build=data.get("build", {}),
                details=data.get("details", {}),
                storage_bytes=(
                    None if data.get("storage_bytes") is None else int(data["storage_bytes"])
                ),
            )
        except KeyError as exc:
            raise RepositoryError(f"malformed variant manifest: missing {exc}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise RepositoryError(f"malformed variant manifest: {exc}") from exc


def _figures_at_length(by_tokens: Mapping[str, LatencyFigures], tokens: int) -> LatencyFigures:
    """The figures at ``tokens`` from those profiled per length (see ``latency_at``)."""
    points = sorted((int(length), figures) for length, figures in by_tokens.items())
    exact = dict(points).get(tokens)
    if exact is not None:
        return LatencyFigures(p50=exact["p50"], p95=exact["p95"])
    shortest, longest = points[0], points[-1]
    if tokens < shortest[0] or len(points) == 1:
        return LatencyFigures(p50=shortest[1]["p50"], p95=shortest[1]["p95"])
    # The pair around ``tokens``; past the longest, the two longest.
    upper = next((i for i, (length, _) in enumerate(points) if length > tokens), len(points) - 1)
    (low_length, low), (high_length, high) = points[upper - 1], points[upper]
    weight = (tokens - low_length) / (high_length - low_length)
    p50 = low["p50"] + weight * (high["p50"] - low["p50"])
    p95 = low["p95"] + weight * (high["p95"] - low["p95"])
    if tokens > longest[0]:
        p50, p95 = max(p50, longest[1]["p50"]), max(p95, longest[1]["p95"])
    return LatencyFigures(p50=p50, p95=p95)


def _batch_latency_json(figures: BatchLatency) -> dict[str, Any]:
    data: dict[str, Any] = {"p50": figures["p50"], "p95": figures["p95"]}
    if "tokens" in figures:
        data["tokens"] = {length: dict(each) for length, each in figures["tokens"].items()}
    return data


def _parse_latency(data: Any) -> LatencyProfile:
    """``latency_ms`` as :meth:`VariantManifest.to_json` writes it, or a ValueError naming the
    first part that is not (keys beside ``p50``, ``p95`` and ``tokens`` are ignored)."""
    profile: LatencyProfile = {}
    for device, by_batch in _mapping(data, "latency_ms").items():
        profile[device] = {}
        for batch, figures in _mapping(by_batch, f"latency_ms.{device}").items():
            where = f"latency_ms.{device}.{batch}"
            _check_count(batch, where, "batch size")
            parsed = BatchLatency(**_figures(figures, where))
            if "tokens" in figures:
                parsed["tokens"] = _figures_by_length(figures["tokens"], f"{where}.tokens")
            profile[device][batch] = parsed
    return profile


def _figures_by_length(value: Any, where: str) -> dict[str, LatencyFigures]:
    by_tokens = _mapping(value, where)
    if not by_tokens:
        raise ValueError(f"{where} lists no lengths")
    for length in by_tokens:
        _check_count(length, f"{where}.{length}", "token count")
    return {length: _figures(each, f"{where}.{length}") for length, each in by_tokens.items()}


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, not {type(value).__name__}")
    return value


def _check_count(key: Any, where: str, what: str) -> None:
    """Raise unless ``key`` spells a positive integer as ``str(int)`` writes it."""
    if not (isinstance(key, str) and key.isdecimal() and key == str(int(key)) and int(key) > 0):
        raise ValueError(f"{where}: {key!r} is not a {what} (a positive integer)")


def _figures(value: Any, where: str) -> LatencyFigures:
    figures = _mapping(value, where)
    parsed: dict[str, float] = {}
    for stat in ("p50", "p95"):
        if stat not in figures:
            raise ValueError(f"{where}: missing '{stat}'")
        figure = figures[stat]
        # bool is an int to Python, but true is no number of milliseconds.
        if isinstance(figure, bool) or not isinstance(figure, int | float):
            raise ValueError(f"{where}.{stat} must be a number of milliseconds, not {figure!r}")
        if not math.isfinite(figure) or figure < 0:
            raise ValueError(f"{where}.{stat} must be finite and not negative, not {figure!r}")
        parsed[stat] = float(figure)
    return LatencyFigures(p50=parsed["p50"], p95=parsed["p95"])


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"cannot read {path}: {exc}") from exc


class ModelRepository:
    """A model repository rooted at a local directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    # --- writing -------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """Create the root if needed and prove a file can be written there, or raise."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex}"
            _write_file(probe, b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise RepositoryError(f"repository {self.root} is not writable: {reason}") from exc

    def register_model(self, record: ModelRecord, tokenizer: bytes | None = None) -> None:
        """Write ``model.json`` atomically (replacing any earlier registration), and first the
        text model's ``tokenizer.json`` it names, so that neither is ever seen without the other."""
        _check_name(record.name, "model")
        if (record.text is None) != (tokenizer is None) or (
            tokenizer is not None and sha256_hex(tokenizer) != record.tokenizer_sha256
        ):
            raise InvalidArgumentError(
                f"model '{record.name}': a text model is registered with the tokenizer its "
                "record names, and only a text model with one"
            )
        model_dir = self.root / record.name
        model_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            staging = model_dir / f".{TOKENIZER_FILE}.{uuid.uuid4().hex}"
            _write_file(staging, tokenizer)
            os.replace(staging, model_dir / TOKENIZER_FILE)
        staging = model_dir / f".{MODEL_FILE}.{uuid.uuid4().hex}"
        _write_file(staging, _json_bytes(record.to_json()))
        os.replace(staging, model_dir / MODEL_FILE)

    def publish_variant(self, manifest: VariantManifest, artifact: bytes) -> Path:
        """Publish one variant atomically; an existing variant of that name is replaced."""
        _check_name(manifest.model, "model")
        _check_name(manifest.variant, "variant")
        if sha256_hex(artifact) != manifest.sha256 or len(artifact) != manifest.size_bytes:
            raise IntegrityError(
                f"variant {manifest.model}/{manifest.variant}: manifest does not describe the "
                "artifact being published"
            )
        model_dir = self.root / manifest.model
        if not (model_dir / MODEL_FILE).is_file():
            raise NotFoundError(f"model '{manifest.model}' is not registered in {self.root}")
        token = uuid.uuid4().hex
        staging = model_dir / f".staging-{manifest.variant}-{token}"
        final = model_dir / manifest.variant
        trash = model_dir / f".trash-{manifest.variant}-{token}"
        replaced_old = False
        try:
            staging.mkdir()
            _write_file(staging / ARTIFACT_FILE, artifact)
            _write_file(staging / MANIFEST_FILE, _json_bytes(manifest.to_json()))
            if final.exists():
                os.rename(final, trash)
                replaced_old = True
            os.rename(staging, final)
        except OSError as exc:
            if replaced_old and not final.exists():
                os.rename(trash, final)  # put the previous variant back: lose nothing
            raise RepositoryError(
                f"cannot publish {manifest.model}/{manifest.variant} to {self.root}: {exc}"
            ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
        return final

    # --- reading -------------------------------------------------------------------------

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise NotFoundError(f"repository {self.root} does not exist")

    def models(self) -> list[str]:
        self._require_root()
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if not entry.name.startswith(".") and (entry / MODEL_FILE).is_file()
        )

    def model(self, name: str) -> ModelRecord:
        self._require_root()
        _check_name(name, "model")
        try:
            return ModelRecord.from_json(_read_json(self.root / name / MODEL_FILE))
        except FileNotFoundError:
            raise NotFoundError(f"model '{name}' not found in repository {self.root}") from None
        except KeyError as exc:
            raise RepositoryError(f"malformed {name}/{MODEL_FILE}: missing {exc}") from exc
        except (TypeError, ValueError, InvalidArgumentError) as exc:
            raise RepositoryError(f"malformed {name}/{MODEL_FILE}: {exc}") from exc

    def variants(self, model: str) -> list[VariantManifest]:
        """Every published variant of ``model``, ready and rejected, sorted by name."""
        self.model(model)
        model_dir = self.root / model
        return [
            self.manifest(model, entry.name)
            for entry in sorted(model_dir.iterdir())
            if not entry.name.startswith(".") and (entry / MANIFEST_FILE).is_file()
        ]

    def manifest(self, model: str, variant: str) -> VariantManifest:
        _check_name(model, "model")
        _check_name(variant, "variant")
        try:
            data = _read_json(self.root / model / variant / MANIFEST_FILE)
        except FileNotFoundError:
            raise NotFoundError(f"variant '{variant}' of model '{model}' not found") from None
        try:
            return VariantManifest.from_json(data)
        except RepositoryError as exc:
            raise RepositoryError(f"{model}/{variant}/{MANIFEST_FILE}: {exc.message}") from exc

    def read_tokenizer(self, record: ModelRecord) -> bytes:
        """A text model's ``tokenizer.json``, verified against ``model.json``'s sha256."""
        if record.text is None:
            raise InvalidArgumentError(f"model '{record.name}' takes no text")
        path = self.root / record.name / TOKENIZER_FILE
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RepositoryError(f"cannot read tokenizer {path}: {exc}") from exc
        if sha256_hex(data) != record.tokenizer_sha256:
            raise IntegrityError(f"tokenizer {path} does not match the sha256 in {MODEL_FILE}")
        return data

    def read_artifact(self, manifest: VariantManifest) -> bytes:
        """The variant's ONNX bytes, verified against the manifest's sha256."""
        _check_name(manifest.model, "model")
        _check_name(manifest.variant, "variant")
        path = self.root / manifest.model / manifest.variant / ARTIFACT_FILE
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RepositoryError(f"cannot read artifact {path}: {exc}") from exc
        if sha256_hex(data) != manifest.sha256:
            raise IntegrityError(
                f"artifact {path} does not match its manifest's sha256; refusing to load it"
            )
        return data
