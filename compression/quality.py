"""Quality metrics on the held-out split, and agreement between two variants' outputs.

A metric is *absolute* when it scores outputs against the held-out labels (``accuracy``), or
*relative* when it scores them against the reference variant's outputs on the same rows
(``cosine``: how close a compressed encoder's embeddings stay to the reference's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gearbox.compression.errors import InvalidArgumentError

DEFAULT_MAX_ACCURACY_DROP = 0.02
"""The accuracy gate: how far below fp32 a ready variant's held-out accuracy may fall."""
DEFAULT_MAX_COSINE_DROP = 0.05
"""The embedding gate: a ready variant's mean cosine to the reference is at least 0.95."""


def row_cosines(outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``outputs`` to the same row of ``reference``."""
    flat = outputs.reshape(len(outputs), -1).astype(np.float64)
    flat_reference = reference.reshape(len(reference), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1) * np.linalg.norm(flat_reference, axis=1)
    return np.sum(flat * flat_reference, axis=1) / np.maximum(norms, 1e-12)


def neighbour_agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows whose nearest other row (by cosine) is the same under both outputs."""
    if len(outputs) < 2:
        raise InvalidArgumentError("neighbour agreement needs at least two rows")

    def nearest(rows: np.ndarray) -> np.ndarray:
        flat = rows.reshape(len(rows), -1).astype(np.float64)
        flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        similarity = flat @ flat.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argmax(similarity, axis=1)

    return float(np.mean(nearest(outputs) == nearest(reference)))


@dataclass(frozen=True)
class QualityMetric:
    """A metric where higher is better, computed from the first output of a model."""

    name: str
    relative: bool
    """Scored against the reference variant's outputs instead of the held-out labels."""
    default_max_drop: float
    """The gate's default: how far below the reference's score a ready variant may fall."""

    def score(self, outputs: np.ndarray, labels: np.ndarray | None) -> float:
        """An absolute metric's score against the held-out labels."""
        if self.name == "accuracy":
            if labels is None:
                raise InvalidArgumentError("metric 'accuracy' needs labels on the held-out split")
            return float(np.mean(np.argmax(outputs, axis=-1) == labels))
        raise InvalidArgumentError(f"metric '{self.name}' is scored against the reference")

    def score_against(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        """A relative metric's score against the reference variant's outputs."""
        self._check_shapes(outputs, reference)
        if self.name == "cosine":
            return float(np.mean(row_cosines(outputs, reference)))
        raise InvalidArgumentError(f"metric '{self.name}' is scored against the labels")

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        """Top-1 agreement with the reference for classification; a relative metric's own
        score (mean cosine for embeddings)."""
        if self.relative:
            return self.score_against(outputs, reference)
        self._check_shapes(outputs, reference)
        return float(np.mean(np.argmax(outputs, axis=-1) == np.argmax(reference, axis=-1)))

    def details(self, outputs: np.ndarray, reference: np.ndarray) -> Mapping[str, float]:
        """Further figures the manifest records beside the score."""
        if self.name != "cosine":
            return {}
        return {
            "min_cosine": float(np.min(row_cosines(outputs, reference))),
            "neighbour_agreement": neighbour_agreement(outputs, reference),
        }

    @staticmethod
    def _check_shapes(outputs: np.ndarray, reference: np.ndarray) -> None:
        if outputs.shape != reference.shape:
            raise InvalidArgumentError(
                f"cannot compare outputs of shape {outputs.shape} with reference {reference.shape}"
            )


METRICS = {
    "accuracy": QualityMetric(
        "accuracy", relative=False, default_max_drop=DEFAULT_MAX_ACCURACY_DROP
    ),
    "cosine": QualityMetric("cosine", relative=True, default_max_drop=DEFAULT_MAX_COSINE_DROP),
}


def get_metric(name: str) -> QualityMetric:
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(METRICS)
        raise InvalidArgumentError(f"unknown quality metric '{name}' (known: {known})") from None
