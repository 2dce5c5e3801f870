"""Tiny models, data providers and specs for the unit tests.

Specs name code by import path, so everything a spec refers to lives here, at module level,
and is named as ``f"{__name__}:attribute"`` (``tests.unit.tiny_model:...``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

from gearbox.compression import (
    DataSplits,
    ModelRecord,
    ModelSpec,
    Signature,
    Split,
    TensorSpec,
    TrainingConfig,
    VariantManifest,
)
from gearbox.compression.repository import Quality, sha256_hex

MODULE = __name__

CONV_SIGNATURE = Signature(
    inputs=(TensorSpec("images", "FP32", (-1, 1, 8, 8)),),
    outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
)
FLAT_SIGNATURE = Signature(
    inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
    outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
)

TRAIN_ROWS = 256
CALIBRATION_ROWS = 64
HELDOUT_ROWS = 64


# --- models ---------------------------------------------------------------------------------


class TinyConvNet(nn.Module):
    """Two narrow conv blocks and a linear head: 8x8 images, 10 classes (~1.7 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class TinyConvStudent(nn.Module):
    """The distillation student of :class:`TinyConvNet`: one 2-channel conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class TinyMlp(nn.Module):
    """Linear layers only: flattened 8x8 images to 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


class PythonListRoundTrip(nn.Module):
    """Leaves torch for Python lists inside ``forward``, which torch.export cannot capture.

    (A ``.numpy()`` round trip is no longer enough: torch.export traces numpy code.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = [torch.tensor(row.tolist()) for row in images.reshape(len(images), -1)]
        return self.linear(torch.stack(rows))


# --- data -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return images, digits.target.astype(np.int64)


def _splits(images: np.ndarray, labels: np.ndarray, name: str) -> DataSplits:
    train_end = TRAIN_ROWS
    calibration_end = train_end + CALIBRATION_ROWS
    heldout_end = calibration_end + HELDOUT_ROWS
    return DataSplits(
        train=Split({name: images[:train_end]}, labels[:train_end]),
        calibration=Split({name: images[train_end:calibration_end]}),
        heldout=Split(
            {name: images[calibration_end:heldout_end]}, labels[calibration_end:heldout_end]
        ),
    )


def tiny_splits() -> DataSplits:
    """A few hundred real digits as (N, 1, 8, 8) images named ``images``."""
    images, labels = _digits()
    return _splits(images, labels, "images")


def tiny_flat_splits() -> DataSplits:
    """The same digits flattened to (N, 64) rows named ``pixels``."""
    images, labels = _digits()
    return _splits(images.reshape(len(images), 64), labels, "pixels")


def splits_without_train_labels() -> DataSplits:
    data = tiny_splits()
    return DataSplits(Split(data.train.inputs), data.calibration, data.heldout)


def splits_with_short_heldout_labels() -> DataSplits:
    data = tiny_splits()
    heldout = Split(data.heldout.inputs, data.heldout.labels[:-1])
    return DataSplits(data.train, data.calibration, heldout)


def splits_with_wrong_shape() -> DataSplits:
    data = tiny_splits()
    calibration = Split({"images": data.calibration.inputs["images"][:, :, :4, :4].copy()})
    return DataSplits(data.train, calibration, data.heldout)


def splits_with_wrong_dtype() -> DataSplits:
    data = tiny_splits()
    train = Split({"images": data.train.inputs["images"].astype(np.float64)}, data.train.labels)
    return DataSplits(train, data.calibration, data.heldout)


def splits_with_empty_heldout() -> DataSplits:
    data = tiny_splits()
    heldout = Split({"images": np.zeros((0, 1, 8, 8), np.float32)}, np.zeros(0, np.int64))
    return DataSplits(data.train, data.calibration, heldout)


def provider_returning_dict() -> dict:
    return {"train": tiny_splits().train}


def provider_that_fails() -> DataSplits:
    raise RuntimeError("the data disk is on fire")


# --- specs ----------------------------------------------------------------------------------


def conv_spec(data_provider: str = "tiny_splits") -> ModelSpec:
    return ModelSpec(
        name="tiny-conv",
        model_factory=f"{MODULE}:TinyConvNet",
        student_factory=f"{MODULE}:TinyConvStudent",
        signature=CONV_SIGNATURE,
        data_provider=f"{MODULE}:{data_provider}",
        training=TrainingConfig(epochs=1, batch_size=64, learning_rate=5e-3),
    )


def mlp_spec() -> ModelSpec:
    return ModelSpec(
        name="tiny-mlp",
        model_factory=f"{MODULE}:TinyMlp",
        signature=FLAT_SIGNATURE,
        data_provider=f"{MODULE}:tiny_flat_splits",
        training=TrainingConfig(epochs=1, batch_size=64, learning_rate=5e-3),
    )


def unexportable_spec() -> ModelSpec:
    return ModelSpec(
        name="unexportable",
        model_factory=f"{MODULE}:PythonListRoundTrip",
        signature=CONV_SIGNATURE,
        data_provider=f"{MODULE}:tiny_splits",
    )


def not_a_spec() -> str:
    return "I am a string"


def spec_that_fails() -> ModelSpec:
    raise RuntimeError("spec factory exploded")


CONV_SPEC = conv_spec()
"""A spec given as an object rather than a function."""


# --- a hand-built ONNX model ----------------------------------------------------------------


def linear_onnx(seed: int = 0) -> bytes:
    """``logits = flatten(images) @ W + b`` for :data:`CONV_SIGNATURE`, built with onnx.helper."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((64, 10)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


# --- repository records ---------------------------------------------------------------------


def make_record(name="tiny"):
    return ModelRecord(
        name=name,
        signature=CONV_SIGNATURE,
        task="classification",
        metric="accuracy",
        reference_variant="fp32",
        spec=f"{MODULE}:conv_spec",
        model_factory=f"{MODULE}:TinyConvNet",
        description="a tiny model",
    )


def make_manifest(artifact, variant="fp32", model="tiny", status="ready", reason=None, **extra):
    return VariantManifest(
        model=model,
        variant=variant,
        technique=extra.pop("technique", "export"),
        params=extra.pop("params", {"opset": "exporter default"}),
        parent=extra.pop("parent", None),
        status=status,
        reason=reason,
        sha256=sha256_hex(artifact),
        size_bytes=len(artifact),
        param_count=extra.pop("param_count", 650),
        quality=Quality(metric="accuracy", value=0.9, reference=0.91, agreement=0.97),
        latency_ms={"cpu": {"1": {"p50": 0.1, "p95": 0.2}, "8": {"p50": 0.3, "p95": 0.4}}},
        build={"node": "host/abc", "seconds": 1.5},
        **extra,
    )
