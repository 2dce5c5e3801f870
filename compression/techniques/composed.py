"""Composed recipes: an ordered list of configs published as one variant.

``pruned -> distilled -> int8`` (the Deep Compression pipeline) prunes the reference, distils
the pruned network from the reference, exports it and quantises the graph; the variant is
named after its steps, ``pruned-distilled-int8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.spec import ModelSpec
from gearbox.compression.techniques.base import Stage, TechniqueConfig


@dataclass(frozen=True)
class ComposedConfig(TechniqueConfig):
    technique: ClassVar[str] = "compose"
    name: str = ""
    """Default: the steps' names joined by ``-``."""
    steps: tuple[TechniqueConfig, ...] = ()

    def __post_init__(self) -> None:
        if len(self.steps) < 2:
            raise InvalidArgumentError("a composed recipe needs at least two steps")
        for step in self.steps:
            if isinstance(step, ComposedConfig):
                raise InvalidArgumentError("a composed recipe's steps cannot be composed recipes")
            if step.technique == "export":
                raise InvalidArgumentError(
                    "'fp32' is where every recipe starts; it is not a step of one"
                )
        stages = [step.stage for step in self.steps]
        first_artifact = stages.index(Stage.ARTIFACT) if Stage.ARTIFACT in stages else len(stages)
        if Stage.MODEL in stages[first_artifact:]:
            late = self.steps[first_artifact + stages[first_artifact:].index(Stage.MODEL)]
            raise InvalidArgumentError(
                f"step '{late.name}' changes the torch model, so it must come before every "
                "step that transforms the exported graph"
            )
        if not self.name:
            object.__setattr__(self, "name", "-".join(step.name for step in self.steps))

    def num_cpus(self, spec: ModelSpec) -> float | None:
        wanted = [cpus for step in self.steps if (cpus := step.num_cpus(spec)) is not None]
        return max(wanted, default=None)
