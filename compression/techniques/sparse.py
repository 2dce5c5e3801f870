"""``sparse``: unstructured magnitude pruning of Conv/Linear weights during fine-tuning.

The smallest-magnitude weights of every Conv and Linear layer are set to zero, a little more at
each mask update, following TF Model Optimization's ``PolynomialDecay`` schedule
(:class:`SparsitySchedule`), while the model fine-tunes on its training data so the remaining
weights make up for the pruned ones. After every optimiser step the masks are applied again, so
a pruned weight stays zero however the optimiser moves it.

The network keeps its shape: ONNX Runtime's dense CPU kernels multiply the zeros like any other
weight, so the variant runs no faster than its parent. What shrinks is storage and transfer:
``storage_bytes`` is the served graph with each weight tensor encoded sparsely
(:func:`encode_artifact`), and :func:`decode_artifact` gives the served graph back exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.onnx_export import export_described, verify_against_torch
from gearbox.compression.spec import Split, TrainingConfig
from gearbox.compression.techniques.base import (
    TechniqueConfig,
    TechniqueInput,
    TransformedModel,
    check_fine_tuning,
)
from gearbox.compression.techniques.registry import register_technique
from gearbox.compression.training import default_finetune_epochs, fine_tune

RANKING = "per-layer magnitude"
"""Each layer loses the same fraction of its weights. A global ranking compares magnitudes
across layers whose scales differ (fan-in sets a layer's typical weight size), so it can empty
a small-weighted layer (DigitsNet's 1.2 M-weight conv block against its 576-weight first conv)
and turn the network's narrowest layers into bottlenecks; per-layer ranking also makes every
tensor's sparsity, hence its storage, known in advance."""

NO_SPEED_UP = (
    "ONNX Runtime's dense CPU kernels multiply the zeros like any other weight, so this "
    "variant is no faster than its parent: storage and transfer shrink, latency does not."
)

WEIGHT_OPERATORS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Attention"})
"""ONNX operators whose weight initializers the exported graph's sparsity is measured on
(``Attention``: ONNX Runtime's fused attention, reading the query/key/value weights at once)."""


@dataclass(frozen=True)
class SparseConfig(TechniqueConfig):
    technique: ClassVar[str] = "sparsify"
    name: str = "sparse"
    sparsity: float = 0.8
    """Fraction of each Conv/Linear weight tensor set to zero by the end of the schedule."""
    initial_sparsity: float = 0.0
    """Sparsity the schedule starts from at its first step."""
    begin_fraction: float = 0.0
    """Where the schedule begins, as a fraction of the fine-tuning steps."""
    end_fraction: float = 0.6
    """Where it reaches ``sparsity``; the steps after it fine-tune with the final masks."""
    power: float = 3.0
    """Exponent of the polynomial decay: sparsity rises fast at first, slowly near the end."""
    update_every_steps: int = 5
    """Optimiser steps between mask updates (TF MOT's ``frequency``); masks are applied after
    every step regardless."""
    finetune_epochs: int | None = None
    """Default: half of the model's training epochs, at least one."""
    finetune_learning_rate_scale: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise InvalidArgumentError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise InvalidArgumentError(
                f"initial_sparsity must be in [0, sparsity={self.sparsity}], "
                f"got {self.initial_sparsity}"
            )
        if not 0.0 <= self.begin_fraction < self.end_fraction <= 1.0:
            raise InvalidArgumentError(
                "the schedule needs 0 <= begin_fraction < end_fraction <= 1, got "
                f"begin_fraction={self.begin_fraction}, end_fraction={self.end_fraction}"
            )
        if self.power <= 0:
            raise InvalidArgumentError(f"power must be > 0, got {self.power}")
        if self.update_every_steps < 1:
            raise InvalidArgumentError(
                f"update_every_steps must be at least 1, got {self.update_every_steps}"
            )
        check_fine_tuning("sparse", self.finetune_epochs, self.finetune_learning_rate_scale)


# --- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsitySchedule:
    """TF Model Optimization's ``PolynomialDecay``, counted in optimiser steps done."""

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3.0
    update_every_steps: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.begin_step < self.end_step:
            raise InvalidArgumentError(
                f"the schedule needs 0 <= begin_step < end_step, got {self.begin_step} and "
                f"{self.end_step}"
            )

    def sparsity_at(self, step: int) -> float:
        """``final + (initial - final) * (1 - progress) ** power``, progress clipped to [0, 1]."""
        clipped = min(max(step, self.begin_step), self.end_step)
        remaining = 1.0 - (clipped - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            remaining**self.power
        )

    def updates_at(self, step: int) -> bool:
        """Whether the masks are recomputed after ``step`` steps: every ``update_every_steps``
        from the beginning, and at the end step, so that the final sparsity is always reached."""
        if not self.begin_step <= step <= self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.update_every_steps == 0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "polynomial_decay",
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "update_every_steps": self.update_every_steps,
        }


def schedule_for(config: SparseConfig, total_steps: int) -> SparsitySchedule:
    """The config's schedule over a fine-tuning of ``total_steps`` optimiser steps."""
    begin_step = math.floor(config.begin_fraction * total_steps)
    end_step = max(begin_step + 1, round(config.end_fraction * total_steps))
    return SparsitySchedule(
        initial_sparsity=config.initial_sparsity,
        final_sparsity=config.sparsity,
        begin_step=begin_step,
        end_step=end_step,
        power=config.power,
        update_every_steps=config.update_every_steps,
    )


# --- masks ----------------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every Conv and Linear layer by module name, a shared weight once."""
    weights: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            continue
        if id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights[f"{name}.weight" if name else "weight"] = module.weight
    return weights


def pruned_count(size: int, sparsity: float) -> int:
    """How many of ``size`` weights a tensor at ``sparsity`` has pruned (rounded half up)."""
    return math.floor(sparsity * size + 0.5)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the weights kept: all but the ``pruned_count`` smallest in magnitude."""
    magnitudes = weight.detach().abs().flatten()
    # Stable, so that zeros pruned earlier (the smallest, tied) stay the ones pruned.
    smallest = torch.argsort(magnitudes, stable=True)[: pruned_count(magnitudes.numel(), sparsity)]
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep[smallest] = False
    return keep.view_as(weight)


class MagnitudePruner:
    """Keeps ``weights`` pruned to the schedule's sparsity while an optimiser trains them."""

    def __init__(self, weights: Mapping[str, nn.Parameter], schedule: SparsitySchedule) -> None:
        self.weights = dict(weights)
        self.schedule = schedule
        self.masks: dict[str, torch.Tensor] = {}
        self.steps_done = 0
        self.mask_updates = 0

    def update_masks(self, sparsity: float) -> None:
        self.masks = {name: magnitude_mask(w, sparsity) for name, w in self.weights.items()}
        self.mask_updates += 1

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            # masked_fill writes +0.0; multiplying by the mask would leave -0.0 in negative weights.
            self.weights[name].masked_fill_(~mask, 0.0)

    def step(self) -> None:
        """After ``steps_done`` optimiser steps: recompute the masks when the schedule says so,
        then zero every pruned weight."""
        if self.schedule.updates_at(self.steps_done):
            self.update_masks(self.schedule.sparsity_at(self.steps_done))
        self.apply_masks()

    def finish(self) -> None:
        """Masks at the final sparsity, reached even if training stopped before the end step
        (a no-op change when the schedule ran to its end: the zeros are the smallest weights)."""
        self.update_masks(self.schedule.final_sparsity)
        self.apply_masks()

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Within the block, :meth:`step` runs after each step of any optimiser that trains
        these weights (the shared training loop exposes no per-step callback); the masks for
        step 0 are applied on entry."""
        tracked = {id(weight) for weight in self.weights.values()}

        def after_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            trains_these = any(
                id(parameter) in tracked
                for group in optimizer.param_groups
                for parameter in group["params"]
            )
            if trains_these:
                self.steps_done += 1
                self.step()

        self.step()
        handle = register_optimizer_step_post_hook(after_step)
        try:
            yield
        finally:
            handle.remove()


# --- the exported graph ---------------------------------------------------------------------


def weight_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The weight matrices and kernels (2-D or more) that Conv/Gemm/MatMul nodes read."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weights: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPERATORS:
            continue
        for name in node.input:
            if name in initializers and name not in weights:
                array = numpy_helper.to_array(initializers[name])
                if array.ndim >= 2:
                    weights[name] = array
    return weights


def without_negative_zeros(onnx_bytes: bytes) -> bytes:
    """The graph with every -0.0 initializer entry written as +0.0.

    Folding BatchNorm into a Conv multiplies pruned zeros by the BN scale, which gives -0.0
    where the scale is negative; a sparse encoding stores only the positions of zeros, so it
    would give +0.0 back. Both are equal as numbers, so the graph computes the same outputs.
    """
    model = onnx.load_from_string(onnx_bytes)
    changed = False
    for index, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind != "f":
            continue
        negative_zeros = (array == 0) & np.signbit(array)
        if negative_zeros.any():
            positive = np.where(negative_zeros, np.zeros_like(array), array)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(positive, tensor.name))
            changed = True
    return model.SerializeToString() if changed else onnx_bytes


# --- sparse storage -------------------------------------------------------------------------


def _smallest_unsigned(largest: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _nonzero(array: np.ndarray) -> np.ndarray:
    """Entries whose bits are not all zero: -0.0 counts as a value, so decoding is bit-exact."""
    return array.view(f"u{array.dtype.itemsize}") != 0


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor in a sparse format.

    ``bitmap``: one bit per entry (numpy ``packbits``, row-major) plus the non-zero values.
    ``csr``: the tensor as a (first dimension, rest) matrix in compressed sparse rows, with
    the smallest unsigned dtype that holds its row pointers and its column indices.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    arrays: Mapping[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())


def encode_bitmap(name: str, array: np.ndarray) -> EncodedTensor:
    flat = array.reshape(-1)
    nonzero = _nonzero(flat)
    return EncodedTensor(
        name,
        array.shape,
        array.dtype.str,
        "bitmap",
        {"bitmap": np.packbits(nonzero), "values": flat[nonzero]},
    )


def encode_csr(name: str, array: np.ndarray) -> EncodedTensor:
    rows = array.shape[0] if array.ndim else 1
    matrix = array.reshape(rows, -1)
    nonzero = _nonzero(matrix)
    # np.nonzero walks row-major, so each row's column indices come out in order.
    _, column_index = np.nonzero(nonzero)
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))])
    return EncodedTensor(
        name,
        array.shape,
        array.dtype.str,
        "csr",
        {
            "indptr": indptr.astype(_smallest_unsigned(int(indptr[-1]))),
            "indices": column_index.astype(_smallest_unsigned(max(matrix.shape[1] - 1, 0))),
            "values": matrix[nonzero],
        },
    )


def encode_tensor(name: str, array: np.ndarray) -> EncodedTensor | None:
    """The smaller of the bitmap and CSR encodings, or None where storing it dense is smaller.

    At float32, a bitmap costs 1/8 byte per entry plus 4 per non-zero, CSR 4 plus 1-2 per
    non-zero: the bitmap wins down to a density of about 1/16 (1/8 with one-byte indices), CSR
    below, dense where few entries are zero (biases)."""
    candidates = [encode_bitmap(name, array), encode_csr(name, array)]
    best = min(candidates, key=lambda encoded: encoded.nbytes)
    return best if best.nbytes < array.nbytes else None


def decode_tensor(encoded: EncodedTensor) -> np.ndarray:
    dtype = np.dtype(encoded.dtype)
    size = math.prod(encoded.shape)
    if encoded.format == "bitmap":
        nonzero = np.unpackbits(encoded.arrays["bitmap"], count=size).astype(bool)
        flat = np.zeros(size, dtype)
        flat[nonzero] = encoded.arrays["values"]
        return flat.reshape(encoded.shape)
    rows = encoded.shape[0] if encoded.shape else 1
    matrix = np.zeros((rows, size // rows if rows else 0), dtype)
    indptr = encoded.arrays["indptr"].astype(np.int64)
    row_of_entry = np.repeat(np.arange(rows), np.diff(indptr))
    matrix[row_of_entry, encoded.arrays["indices"].astype(np.int64)] = encoded.arrays["values"]
    return matrix.reshape(encoded.shape)


@dataclass(frozen=True)
class SparseArtifact:
    """An ONNX graph stored sparsely: the graph with the encoded initializers' data removed
    (their names, shapes and types stay), and those initializers' encodings."""

    skeleton: bytes
    tensors: tuple[EncodedTensor, ...]

    @property
    def nbytes(self) -> int:
        return len(self.skeleton) + sum(tensor.nbytes for tensor in self.tensors)

    def formats(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.format] = counts.get(tensor.format, 0) + 1
        return counts


def encode_artifact(onnx_bytes: bytes) -> SparseArtifact:
    """Every initializer of the graph that some sparse format stores in fewer bytes than dense,
    encoded so; everything else (other initializers, the graph itself) stays as ONNX."""
    model = onnx.load_from_string(onnx_bytes)
    encoded: list[EncodedTensor] = []
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind != "f" or array.size == 0:
            continue
        sparse = encode_tensor(tensor.name, array)
        if sparse is not None:
            encoded.append(sparse)
            tensor.CopyFrom(
                onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            )
    return SparseArtifact(model.SerializeToString(), tuple(encoded))


def decode_artifact(artifact: SparseArtifact) -> bytes:
    """The ONNX graph :func:`encode_artifact` encoded, with every weight as it was."""
    model = onnx.load_from_string(artifact.skeleton)
    by_name = {tensor.name: tensor for tensor in artifact.tensors}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in by_name:
            decoded = decode_tensor(by_name[tensor.name])
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(decoded, tensor.name))
    return model.SerializeToString()


# --- the technique --------------------------------------------------------------------------


def _sparsity_of(array: np.ndarray) -> float:
    return float((array == 0).sum() / array.size)


def _training_steps(split: Split, training: TrainingConfig, epochs: int) -> int:
    """Optimiser steps of :func:`gearbox.compression.training.fit`: one per batch per epoch."""
    return epochs * math.ceil(len(split) / training.batch_size)


@register_technique(SparseConfig)
def sparsify(config: SparseConfig, model: nn.Module, inputs: TechniqueInput) -> TransformedModel:
    """Prune while fine-tuning, export, and encode the served weights sparsely.

    The handler exports the graph itself: its sparsity and storage are measured on the
    initializers actually served, which a later model step would overwrite anyway.
    """
    training = inputs.spec.training or TrainingConfig()
    epochs = default_finetune_epochs(training, config.finetune_epochs, 2)
    learning_rate = training.learning_rate * config.finetune_learning_rate_scale
    total_steps = _training_steps(inputs.data.train, training, epochs)
    schedule = schedule_for(config, total_steps)
    pruner = MagnitudePruner(prunable_weights(model), schedule)
    inputs.report("pruning while fine-tuning", 0.05)

    def on_epoch(done: int, total: int) -> None:
        inputs.report(f"fine-tuning epoch {done}/{total}", 0.05 + 0.7 * done / total)

    with pruner.attached():
        fine_tune(
            model,
            inputs.reference_model,
            inputs.spec,
            inputs.data.train,
            training,
            epochs,
            learning_rate,
            on_epoch,
        )
    pruner.finish()

    inputs.report("exporting to ONNX", 0.78)
    exported = export_described(model, inputs.spec, inputs.data.heldout)
    served = without_negative_zeros(exported.onnx)
    negative_zeros_cleared = served is not exported.onnx
    if negative_zeros_cleared:
        verify_against_torch(served, model, inputs.spec, inputs.data.heldout)
    inputs.report("encoding sparse storage", 0.82)
    storage = encode_artifact(served)
    weights = weight_initializers(onnx.load_from_string(served))
    weight_count = sum(array.size for array in weights.values())
    zero_count = sum(int((array == 0).sum()) for array in weights.values())
    return TransformedModel(
        model=model,
        details={
            "target_sparsity": config.sparsity,
            "achieved_sparsity": zero_count / weight_count if weight_count else 0.0,
            "layer_sparsity": {name: _sparsity_of(array) for name, array in weights.items()},
            "pruned_weights": zero_count,
            "ranking": RANKING,
            "schedule": {**schedule.describe(), "total_steps": total_steps},
            "mask_updates": pruner.mask_updates,
            "finetune_epochs": epochs,
            "finetune_learning_rate": learning_rate,
            "storage_format": {
                "encoding": "smallest of dense, bitmap (packbits + non-zero values) and CSR "
                "(smallest index dtypes) per initializer, beside the graph without their data",
                "tensors": storage.formats(),
                "artifact_bytes": len(served),
                "storage_bytes": storage.nbytes,
            },
            "latency": NO_SPEED_UP,
            "export": {**exported.description, "negative_zeros_cleared": negative_zeros_cleared},
        },
        storage_bytes=storage.nbytes,
        onnx=served,
    )
