"""Quality metrics on the held-out split, and agreement between two variants' outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gearbox.compression.errors import InvalidArgumentError

DEFAULT_MAX_ACCURACY_DROP = 0.02
"""The accuracy gate: how far below fp32 a ready variant's held-out quality may fall."""


@dataclass(frozen=True)
class QualityMetric:
    """A metric where higher is better, computed from the first output of a model."""

    name: str

    def score(self, outputs: np.ndarray, labels: np.ndarray | None) -> float:
        if self.name == "accuracy":
            if labels is None:
                raise InvalidArgumentError("metric 'accuracy' needs labels on the held-out split")
            return float(np.mean(np.argmax(outputs, axis=-1) == labels))
        raise InvalidArgumentError(f"unknown quality metric '{self.name}'")

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        """Fraction of rows whose top-1 equals the reference variant's top-1."""
        if outputs.shape != reference.shape:
            raise InvalidArgumentError(
                f"cannot compare outputs of shape {outputs.shape} with reference {reference.shape}"
            )
        return float(np.mean(np.argmax(outputs, axis=-1) == np.argmax(reference, axis=-1)))


METRICS = {"accuracy": QualityMetric("accuracy")}


def get_metric(name: str) -> QualityMetric:
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(METRICS)
        raise InvalidArgumentError(f"unknown quality metric '{name}' (known: {known})") from None
