"""The built-in ``digits`` example: a CNN on scikit-learn's bundled handwritten digits.

Real data with real labels (1,797 8x8 greyscale images, 10 classes), shipped inside
scikit-learn, so nothing is downloaded. The network is deliberately wide for its input
(about 2.7 M parameters, ~52 M multiply-adds per image) so that one request takes over a
millisecond on one CPU thread and the compressed variants differ measurably.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from gearbox.compression.signature import Signature, TensorSpec
from gearbox.compression.spec import DataSplits, ModelSpec, Split, TrainingConfig

HELDOUT_FRACTION = 0.2
CALIBRATION_SAMPLES = 256


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class DigitsNet(nn.Module):
    """Five 3x3 conv blocks (8x8 -> 4x4 -> 2x2) and a two-layer classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(1, 64),
            *_conv_block(64, 128),
            *_conv_block(128, 256),
            nn.MaxPool2d(2),
            *_conv_block(256, 256),
            *_conv_block(256, 512),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(512 * 2 * 2, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class DigitsStudent(nn.Module):
    """The distillation student: three narrow conv blocks and a linear head (~98 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(1, 32),
            *_conv_block(32, 64),
            nn.MaxPool2d(2),
            *_conv_block(64, 128),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 2 * 2, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def load_splits() -> DataSplits:
    """Stratified held-out split; calibration rows are drawn from the training split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_x, heldout_x, train_y, heldout_y = train_test_split(
        images, labels, test_size=HELDOUT_FRACTION, stratify=labels, random_state=0
    )
    calibration_rows = np.random.default_rng(0).choice(
        len(train_x), CALIBRATION_SAMPLES, replace=False
    )
    return DataSplits(
        train=Split({"images": train_x}, train_y),
        calibration=Split({"images": train_x[calibration_rows]}),
        heldout=Split({"images": heldout_x}, heldout_y),
    )


def shift_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (zero fill)."""
    batch, _, height, width = images.shape
    padded = nn.functional.pad(images, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (batch,), generator=generator)
    dx = torch.randint(0, 3, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    return padded[torch.arange(batch)[:, None, None], 0, rows, cols][:, None]


SIGNATURE = Signature(
    inputs=(TensorSpec("images", "FP32", (-1, 1, 8, 8)),),
    outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
)


def spec(epochs: int = 10) -> ModelSpec:
    return ModelSpec(
        name="digits",
        model_factory=f"{__name__}:DigitsNet",
        student_factory=f"{__name__}:DigitsStudent",
        signature=SIGNATURE,
        data_provider=f"{__name__}:load_splits",
        task="classification",
        metric="accuracy",
        training=TrainingConfig(
            epochs=epochs,
            batch_size=64,
            learning_rate=3e-3,
            augment=f"{__name__}:shift_augment",
            num_cpus=2,
        ),
        description="CNN classifier for scikit-learn's 8x8 handwritten digits",
        source=f"{__name__}:spec",
    )
