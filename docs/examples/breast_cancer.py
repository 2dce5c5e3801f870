"""A complete model registered with Gearbox: a small classifier of breast-cancer biopsies.

The data is scikit-learn's bundled Wisconsin diagnostic breast-cancer set (569 real biopsies,
30 measurements each, labelled malignant or benign), shipped inside scikit-learn, so nothing is
downloaded. From the repository root:

    gearbox compress --spec docs.examples.breast_cancer:spec --repo cancer-repo

``docs/REGISTERING.md`` walks through every part of this file and the commands around it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

from gearbox.compression import DataSplits, ModelSpec, Signature, Split, TensorSpec, TrainingConfig

FEATURES = 30
CLASSES = ("malignant", "benign")  # scikit-learn's label order: 0 is malignant
HELDOUT_FRACTION = 0.2
CALIBRATION_ROWS = 128


def load_splits() -> DataSplits:
    """The data provider: training, calibration and held-out splits, inputs named as in the
    signature, one label per row where quality is judged against labels.

    The same seed every call: Gearbox calls this on whichever Ray node needs the data, and a
    variant is rebuilt only when its data changes, so the splits must not move between calls.
    """
    data = load_breast_cancer()
    measurements = data.data.astype(np.float32)  # float64 in scikit-learn; the signature says FP32
    labels = data.target.astype(np.int64)
    train_x, heldout_x, train_y, heldout_y = train_test_split(
        measurements, labels, test_size=HELDOUT_FRACTION, stratify=labels, random_state=0
    )
    calibration = np.random.default_rng(0).choice(len(train_x), CALIBRATION_ROWS, replace=False)
    return DataSplits(
        train=Split({"measurements": train_x}, train_y),
        calibration=Split({"measurements": train_x[calibration]}),  # no labels needed
        heldout=Split({"measurements": heldout_x}, heldout_y),
    )


class Standardize(nn.Module):
    """Scales each measurement by the training split's mean and spread, inside the graph, so that
    callers send raw measurements and every variant (and its ONNX file) carries the scaling."""

    def __init__(self) -> None:
        super().__init__()
        train = load_splits().train.inputs["measurements"]
        self.register_buffer("mean", torch.from_numpy(train.mean(axis=0)))
        self.register_buffer("scale", torch.from_numpy(train.std(axis=0) + 1e-6))

    def forward(self, measurements: torch.Tensor) -> torch.Tensor:
        return (measurements - self.mean) / self.scale


class CancerNet(nn.Module):
    """The model factory's network: two hidden layers of 128 (about 21 k parameters)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.standardize = Standardize()
        self.layers = nn.Sequential(
            nn.Linear(FEATURES, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, len(CLASSES)),
        )

    def forward(self, measurements: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(measurements))


def build_student() -> nn.Module:
    """The distillation student: the same network with 8 hidden units per layer."""
    return CancerNet(hidden=8)


SIGNATURE = Signature(
    # -1: any size. The first dimension is the batch: a request may carry any number of rows.
    inputs=(TensorSpec("measurements", "FP32", (-1, FEATURES)),),
    outputs=(TensorSpec("logits", "FP32", (-1, len(CLASSES))),),
)


def spec() -> ModelSpec:
    """What ``--spec docs.examples.breast_cancer:spec`` names: every callable by import path."""
    return ModelSpec(
        name="breast-cancer",
        model_factory=f"{__name__}:CancerNet",
        student_factory=f"{__name__}:build_student",
        data_provider=f"{__name__}:load_splits",
        signature=SIGNATURE,
        task="classification",
        metric="accuracy",
        # CancerNet() starts untrained: Gearbox trains it on the training split first.
        training=TrainingConfig(epochs=40, batch_size=32, learning_rate=3e-3),
        description="MLP on scikit-learn's Wisconsin breast-cancer biopsies",
    )
