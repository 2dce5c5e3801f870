"""What every technique shares: its config base class, its inputs and its output."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from gearbox.compression.spec import DataSplits, ModelSpec

ProgressFn = Callable[[str, float], None]
"""Report progress: (stage description, fraction of the whole variant done in [0, 1])."""


def _ignore_progress(stage: str, fraction: float) -> None:
    pass


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique config.

    ``name`` is the variant the config publishes. ``parent`` names the variant whose ONNX
    artifact the technique transforms (quantisation does); techniques that start from the
    trained torch model leave it ``None``.
    """

    technique: ClassVar[str]
    name: str
    parent: str | None = None

    def num_cpus(self, spec: ModelSpec) -> float | None:
        """CPUs the build of this variant asks Ray for; ``None``: the pipeline's default."""
        return None


@dataclass
class TechniqueInput:
    spec: ModelSpec
    data: DataSplits
    reference_model: nn.Module
    parent_artifact: bytes | None = None
    parent_param_count: int | None = None
    report: ProgressFn = field(default=_ignore_progress)


@dataclass(frozen=True)
class CompressedModel:
    """A technique's result: the ONNX artifact and what the manifest should record about it."""

    onnx: bytes
    param_count: int
    params: Mapping[str, Any]
