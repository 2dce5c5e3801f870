"""What a user registers: a model factory, its signature, its data and how quality is measured.

A :class:`ModelSpec` names code by import path (``package.module:attribute``) rather than holding
objects, so that it can be written to ``model.json``, sent to Ray workers on any node and
re-resolved there.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.signature import Signature, TextInput

TASKS: Mapping[str, str] = {"classification": "accuracy", "embedding": "cosine"}
"""Each task and the quality metric it is judged by."""


def import_object(path: str, what: str) -> Any:
    """Resolve ``package.module:attribute`` or raise one clear error naming ``what``."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidArgumentError(
            f"{what} '{path}' is not an import path of the form package.module:attribute"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is the user's input error
        raise InvalidArgumentError(f"cannot import {what} '{path}': {exc}") from exc
    try:
        obj: Any = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise InvalidArgumentError(
            f"cannot import {what} '{path}': module '{module_name}' has no attribute '{attribute}'"
        ) from exc
    return obj


@dataclass(frozen=True)
class TrainingConfig:
    """How Gearbox trains the factory's freshly initialised module before compressing it.

    ``augment`` optionally names a function ``(inputs: torch.Tensor, generator) -> torch.Tensor``
    applied to each training batch.
    """

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: str | None = None
    num_cpus: float = 1.0
    """CPUs the training asks Ray for (at most a node's), and torch's thread count in it."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise InvalidArgumentError(
                "training needs epochs >= 1, batch_size >= 1 and a positive learning_rate"
            )


@dataclass(frozen=True)
class Split:
    """One split of the data: inputs by signature name, labels where the task has them."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, count: int, offset: int = 0) -> dict[str, np.ndarray]:
        return {name: array[offset : offset + count] for name, array in self.inputs.items()}


@dataclass(frozen=True)
class DataSplits:
    """Training, calibration (for static quantisation) and held-out (for evaluation) splits."""

    train: Split
    calibration: Split
    heldout: Split


@dataclass(frozen=True)
class ModelSpec:
    """A registered model. Every callable is an import path, resolved where it is used.

    - ``model_factory``: ``() -> torch.nn.Module``. Without ``training`` it must return trained
      weights; with ``training`` Gearbox trains the module it returns.
    - ``data_provider``: ``() -> DataSplits``.
    - ``student_factory``: ``() -> torch.nn.Module`` for distillation; without one the student is
      the teacher's own architecture at a fraction of its width.
    - ``tokenizer_file``: ``() -> path`` of a text model's ``tokenizer.json`` (the ``tokenizers``
      library's format), copied into the repository so that serving needs nothing else.
    """

    name: str
    model_factory: str
    signature: Signature
    data_provider: str
    task: str = "classification"
    metric: str = "accuracy"
    training: TrainingConfig | None = None
    student_factory: str | None = None
    student_training: TrainingConfig | None = None
    """How a distilled student is trained; default: ``training`` (a pretrained model without
    one gets :class:`TrainingConfig`'s defaults, which suit small models trained from scratch)."""
    default_variants: tuple[str, ...] = ()
    """The variants built when none are asked for; empty: the core four."""
    text: TextInput | None = None
    """Set for a model that takes sentences: the gateway tokenizes them (``tokenizer_file``)."""
    tokenizer_file: str | None = None
    description: str = ""
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise InvalidArgumentError(
                f"model name '{self.name}' must be non-empty letters, digits, '-', '_' or '.'"
            )
        if self.name.startswith("."):
            raise InvalidArgumentError(f"model name '{self.name}' must not start with '.'")
        if self.task not in TASKS:
            raise InvalidArgumentError(
                f"model '{self.name}': unknown task '{self.task}' (known: {', '.join(TASKS)})"
            )
        if self.metric != TASKS[self.task]:
            raise InvalidArgumentError(
                f"model '{self.name}': task '{self.task}' is judged by metric "
                f"'{TASKS[self.task]}', not '{self.metric}'"
            )
        if (self.text is None) != (self.tokenizer_file is None):
            raise InvalidArgumentError(
                f"model '{self.name}': a text input and a tokenizer_file go together"
            )
        if self.text is not None:
            self.text.check_against(self.signature)

    def read_tokenizer(self) -> bytes | None:
        """The text model's ``tokenizer.json``; None for a model that takes no text."""
        if self.tokenizer_file is None:
            return None
        locate: Callable[[], Any] = import_object(self.tokenizer_file, "tokenizer file")
        path = locate()
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            raise InvalidArgumentError(
                f"model '{self.name}': cannot read tokenizer file {path}: {exc.strerror or exc}"
            ) from exc

    def build_model(self) -> Any:
        factory: Callable[[], Any] = import_object(self.model_factory, "model factory")
        return factory()

    def build_student(self) -> Any | None:
        if self.student_factory is None:
            return None
        factory: Callable[[], Any] = import_object(self.student_factory, "student factory")
        return factory()

    def load_data(self) -> DataSplits:
        provider: Callable[[], DataSplits] = import_object(self.data_provider, "data provider")
        try:
            data = provider()
        except Exception as exc:
            raise InvalidArgumentError(
                f"data provider '{self.data_provider}' failed: {exc}"
            ) from exc
        if not isinstance(data, DataSplits):
            raise InvalidArgumentError(
                f"data provider '{self.data_provider}' returned {type(data).__name__}, "
                "not DataSplits"
            )
        for split_name in ("train", "calibration", "heldout"):
            split: Split = getattr(data, split_name)
            where = f"model '{self.name}', {split_name} split"
            self.signature.check_inputs(split.inputs, where)
            needs_labels = self.task == "classification" and split_name != "calibration"
            if needs_labels and (split.labels is None or len(split.labels) != len(split)):
                raise InvalidArgumentError(f"{where} needs one label per row")
        return data


def load_spec(path: str) -> ModelSpec:
    """Load the spec returned by the function at ``package.module:function``."""
    target = import_object(path, "model spec")
    try:
        spec = target() if callable(target) else target
    except Exception as exc:
        raise InvalidArgumentError(f"model spec '{path}' failed: {exc}") from exc
    if not isinstance(spec, ModelSpec):
        raise InvalidArgumentError(
            f"model spec '{path}' gave {type(spec).__name__}, not a gearbox ModelSpec"
        )
    return spec if spec.source is not None else dataclasses.replace(spec, source=path)
