"""What every technique shares: its config base class, its inputs and its results.

A technique works at one of two stages. A *model* technique transforms the torch model
(pruning, distillation, low-rank factorisation, ...); Gearbox exports its result to ONNX. An
*artifact* technique transforms an exported ONNX graph (quantisation). A composed recipe runs
model steps first, exports once, then runs artifact steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from torch import nn

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.spec import DataSplits, ModelSpec

ProgressFn = Callable[[str, float], None]
"""Report progress: (stage description, fraction of the whole variant done in [0, 1])."""


def _ignore_progress(stage: str, fraction: float) -> None:
    pass


class Stage(StrEnum):
    MODEL = "model"
    """Transforms the torch model; the result is exported to ONNX afterwards."""
    ARTIFACT = "artifact"
    """Transforms an ONNX artifact."""


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique config.

    ``name`` is the variant the config publishes. ``parent`` names the variant whose ONNX
    artifact an artifact technique transforms when it runs on its own; model techniques start
    from the trained reference model and leave it ``None``.
    """

    technique: ClassVar[str]
    stage: ClassVar[Stage] = Stage.MODEL
    name: str
    parent: str | None = None

    def num_cpus(self, spec: ModelSpec) -> float | None:
        """CPUs the build of this variant asks Ray for; ``None``: the pipeline's default."""
        return None


def check_fine_tuning(
    technique: str, epochs: int | None, learning_rate_scale: float, min_epochs: int = 1
) -> None:
    """The checks of the two fields every fine-tuning technique has: ``finetune_epochs``
    (None: the technique's default; ``min_epochs`` 0 lets a technique skip fine-tuning) and
    ``finetune_learning_rate_scale`` (of the model's own training rate)."""
    if epochs is not None and epochs < min_epochs:
        raise InvalidArgumentError(
            f"{technique} finetune_epochs must be at least {min_epochs} (or None), got {epochs}"
        )
    if learning_rate_scale <= 0:
        raise InvalidArgumentError(
            f"{technique} finetune_learning_rate_scale must be positive, got {learning_rate_scale}"
        )


@dataclass
class TechniqueInput:
    spec: ModelSpec
    data: DataSplits
    reference_model: nn.Module
    """The trained reference: a model technique's teacher, never modified."""
    parent_artifact: bytes | None = None
    parent_param_count: int | None = None
    report: ProgressFn = field(default=_ignore_progress)
    steps_before: tuple[str, ...] = ()
    """In a composed recipe, the names of the steps already applied to the model a step gets;
    empty when the technique starts from the reference."""


@dataclass(frozen=True)
class TransformedModel:
    """A model technique's result."""

    model: nn.Module
    details: Mapping[str, Any]
    """What the technique did and measured, for the manifest."""
    storage_bytes: int | None = None
    """Bytes of the compressed storage form where it differs from the served artifact
    (a codebook and packed indices, a sparse encoding), measured by actually encoding it."""
    onnx: bytes | None = None
    """The technique's own export (a QDQ graph, say); None: Gearbox's standard export."""


@dataclass(frozen=True)
class TransformedArtifact:
    """An artifact technique's result."""

    onnx: bytes
    details: Mapping[str, Any]


@dataclass(frozen=True)
class CompressedModel:
    """What applying a config gives: the ONNX artifact and what the manifest records of it."""

    onnx: bytes
    param_count: int
    details: Mapping[str, Any]
    storage_bytes: int | None = None
    """Compressed storage size where it differs from the artifact's; None: the artifact's."""

    @property
    def stored_size(self) -> int:
        return len(self.onnx) if self.storage_bytes is None else self.storage_bytes
