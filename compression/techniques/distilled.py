"""``distilled``: a smaller student trained on its teacher: a classifier on the softened outputs
and the labels, an encoder on the embeddings and, layer by layer, the token outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.spec import ModelSpec, TrainingConfig
from gearbox.compression.surgery import count_parameters, shrink_channels
from gearbox.compression.techniques.base import TechniqueConfig, TechniqueInput, TransformedModel
from gearbox.compression.techniques.registry import register_technique
from gearbox.compression.training import distill, uses_layer_loss


@dataclass(frozen=True)
class DistilledConfig(TechniqueConfig):
    technique: ClassVar[str] = "distill"
    name: str = "distilled"
    temperature: float = 4.0
    soft_weight: float = 0.7
    """Weight of the soft (teacher) loss; the hard-label loss gets the rest."""
    hidden_weight: float = 1.0
    """Encoders whose layers the student was cut from: weight of the layer-by-layer loss
    (:func:`gearbox.compression.training.layer_loss`) beside the embedding's cosine."""
    epochs: int | None = None
    """Default: the model's own training epochs."""
    width: float = 0.25
    """Student width relative to the teacher, used when the spec names no student factory."""

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0.0 <= self.soft_weight <= 1.0:
            raise InvalidArgumentError(
                "distillation needs temperature > 0 and soft_weight in [0, 1]"
            )
        if self.hidden_weight < 0:
            raise InvalidArgumentError(
                f"distillation's hidden_weight must be >= 0, got {self.hidden_weight}"
            )
        if not 0.0 < self.width < 1.0:
            raise InvalidArgumentError(f"student width must be in (0, 1), got {self.width}")

    def num_cpus(self, spec: ModelSpec) -> float | None:
        """The student's training config says how many CPUs its training uses."""
        return _student_training(spec).num_cpus


def _student_training(spec: ModelSpec) -> TrainingConfig:
    return spec.student_training or spec.training or TrainingConfig()


@register_technique(DistilledConfig)
def distill_student(
    config: DistilledConfig, model: nn.Module, inputs: TechniqueInput
) -> TransformedModel:
    """The student is ``model`` itself after earlier steps of a composed recipe (a pruned
    network, say); otherwise the spec's student, or the teacher shrunk to ``width``."""
    spec = inputs.spec
    inputs.report("building student", 0.05)
    built = None if inputs.steps_before else spec.build_student()
    if inputs.steps_before:
        student, student_origin = model, f"the result of {' -> '.join(inputs.steps_before)}"
    elif built is not None:
        student, student_origin = built, spec.student_factory
    else:
        student, _ = shrink_channels(model, keep_ratio=config.width)
        student_origin = f"teacher architecture at width {config.width}"
    training = _student_training(spec)
    epochs = config.epochs or training.epochs
    distill(
        student,
        inputs.reference_model,
        spec,
        inputs.data.train,
        training,
        epochs=epochs,
        temperature=config.temperature,
        soft_weight=config.soft_weight,
        hidden_weight=config.hidden_weight,
        on_epoch=lambda done, total: inputs.report(
            f"distilling epoch {done}/{total}", 0.1 + 0.75 * done / total
        ),
    )
    layered = uses_layer_loss(spec, student, inputs.reference_model, config.hidden_weight)
    return TransformedModel(
        model=student,
        details={
            "student": student_origin,
            **(
                {
                    "loss": "1 - cosine to the teacher's embedding"
                    + (" + hidden_weight * layer loss" if layered else ""),
                    **({"hidden_weight": config.hidden_weight} if layered else {}),
                }
                if spec.task == "embedding"
                else {"temperature": config.temperature, "soft_weight": config.soft_weight}
            ),
            "epochs": epochs,
            "learning_rate": training.learning_rate,
            "teacher_params": count_parameters(inputs.reference_model),
        },
    )
