"""``distilled``: a smaller student trained on its teacher: a classifier on the softened outputs
and the labels, an encoder on the embeddings and, layer by layer, the token outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.onnx_export import export_verified
from gearbox.compression.spec import ModelSpec, TrainingConfig
from gearbox.compression.surgery import count_parameters, shrink_channels
from gearbox.compression.techniques.base import CompressedModel, TechniqueConfig, TechniqueInput
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
def distill_student(config: DistilledConfig, inputs: TechniqueInput) -> CompressedModel:
    spec = inputs.spec
    inputs.report("building student", 0.05)
    student = spec.build_student()
    if student is None:
        student, _ = shrink_channels(inputs.reference_model, keep_ratio=config.width)
        student_origin = f"teacher architecture at width {config.width}"
    else:
        student_origin = spec.student_factory
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
    inputs.report("exporting to ONNX", 0.88)
    layered = uses_layer_loss(spec, student, inputs.reference_model, config.hidden_weight)
    return CompressedModel(
        onnx=export_verified(student, spec, inputs.data.heldout),
        param_count=count_parameters(student),
        params={
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
