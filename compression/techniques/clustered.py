"""``clustered``: weight sharing by per-layer k-means, then fine-tuning with the centroids tied.

Deep Compression (Han et al., 2016) stores each large Conv/Linear weight tensor as a small
codebook of ``clusters`` float32 centroids and one ``ceil(log2(clusters))``-bit index per
weight: at 16 clusters a weight costs 4 bits instead of 32. The served artifact is still the
ordinary dense FP32 ONNX graph (every weight materialised from its codebook), so serving speed
is the reference's; what shrinks is the *stored* form, whose size this technique measures by
actually packing the graph's initializers (:func:`pack_storage`, read back by
:func:`unpack_storage`).

Steps:

1. BatchNorms that directly follow a Conv/Linear are folded into it first. ONNX Runtime folds
   them at export anyway, which would rescale every output channel of a clustered weight and
   leave it with far more than ``clusters`` distinct values; clustering the folded weight
   means the served graph holds exactly the shared values.
2. Each Conv/Linear weight with at least ``min_weights`` elements is clustered with
   scikit-learn's k-means, *linearly initialised* over [min, max] as Han et al. recommend
   (unlike density-based or k-means++ seeding, it keeps centroids for the rare large weights,
   which matter most).
3. Each clustered weight is parametrised as ``codebook[indices]`` with the codebook a trainable
   parameter, so each centroid's gradient is the sum of its weights' gradients, and the model
   is fine-tuned on the labels with the reference's training config.
4. The parametrisations are removed with the weights left materialised (plain ``nn.Conv2d`` /
   ``nn.Linear``), the model is exported with Gearbox's standard export, and the exported
   graph's initializers are packed.

Storage container (all integers little-endian)::

    b"GBCLUST1"                      magic and format version
    uint32                           length of the JSON header in bytes
    JSON header                      {"tensors": [entry, ...]} in payload order
    payload                          each entry's bytes, back to back

An entry is ``{"name", "shape", "dtype", "encoding": "raw"}`` (the tensor's C-order bytes in
its own dtype, float32 for every float parameter) or ``{"name", "shape", "dtype": "float32",
"encoding": "codebook", "entries": k, "bits": b}``: ``k`` float32 centroids, then the
``prod(shape)`` indices packed most significant bit first at ``b`` bits each
(``numpy.packbits``), padded to a whole byte.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from sklearn.cluster import KMeans
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from gearbox.compression.errors import CompressionError, InvalidArgumentError
from gearbox.compression.onnx_export import export_described
from gearbox.compression.spec import TrainingConfig
from gearbox.compression.techniques.base import (
    TechniqueConfig,
    TechniqueInput,
    TransformedModel,
    check_fine_tuning,
)
from gearbox.compression.techniques.registry import register_technique
from gearbox.compression.training import default_finetune_epochs, fine_tune

MAX_CLUSTERS = 256
"""Beyond 8-bit indices a codebook no longer saves much over the float32 weights it shares."""

STORAGE_MAGIC = b"GBCLUST1"
_HEADER_LENGTH = struct.Struct("<I")

_CLUSTERABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV_BATCH_NORMS = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}


@dataclass(frozen=True)
class ClusteredConfig(TechniqueConfig):
    technique: ClassVar[str] = "cluster"
    name: str = "clustered"
    clusters: int = 16
    """Centroids per layer; each weight is stored as a ceil(log2(clusters))-bit index."""
    min_weights: int = 1024
    """Layers with fewer weights stay dense: they cost little and are often the most
    sensitive (the first convolution, say)."""
    finetune_epochs: int | None = None
    """Epochs of fine-tuning with the centroids shared; 0 keeps the k-means centroids.
    Default: a third of the model's training epochs, at least one."""
    finetune_learning_rate_scale: float = 0.1
    """Fraction of the model's training learning rate. Adam moves each centroid by about the
    learning rate per step, and a centroid carries thousands of weights, so a fraction keeps
    the steps well below the spacing between centroids."""

    def __post_init__(self) -> None:
        if not 2 <= self.clusters <= MAX_CLUSTERS:
            raise InvalidArgumentError(
                f"clusters must be between 2 and {MAX_CLUSTERS}, got {self.clusters}"
            )
        if self.min_weights < self.clusters:
            raise InvalidArgumentError(
                f"min_weights must be at least clusters ({self.clusters}), got {self.min_weights}"
            )
        check_fine_tuning(
            "clustered", self.finetune_epochs, self.finetune_learning_rate_scale, min_epochs=0
        )

    @property
    def bits_per_index(self) -> int:
        return index_bits(self.clusters)


def index_bits(clusters: int) -> int:
    return max(1, math.ceil(math.log2(clusters)))


# --- folding BatchNorm into the layer before it ----------------------------------------------


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fold_batch_norms(model: nn.Module) -> list[str]:
    """Fold every BatchNorm whose only input is a Conv/Linear used once, and used only by it,
    into that layer (in eval mode); the BatchNorm becomes ``nn.Identity``. Returns the folded
    BatchNorms' names. A model torch.fx cannot trace is left as it is."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _CLUSTERABLE):
            continue
        users = list(node.users)
        if calls[node.target] != 1 or len(users) != 1 or users[0].op != "call_module":
            continue
        layer, norm = modules[node.target], modules[users[0].target]
        expected_norm = _CONV_BATCH_NORMS[type(layer)]
        if type(norm) is not expected_norm or calls[users[0].target] != 1:
            continue
        if norm.running_mean is None or users[0].args[:1] != (node,):
            continue
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        _set_submodule(model, node.target, fuse(layer.eval(), norm.eval()))
        _set_submodule(model, users[0].target, nn.Identity())
        folded.append(users[0].target)
    return folded


# --- weight sharing ---------------------------------------------------------------------------


class SharedCodebook(nn.Module):
    """Parametrises a weight as ``codebook[indices]``: the parametrised module's trainable
    tensor is the codebook, so every weight of a cluster moves with its centroid."""

    def __init__(self, indices: torch.Tensor, clusters: int) -> None:
        super().__init__()
        self.clusters = clusters
        self.register_buffer("indices", indices)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook[self.indices]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The codebook closest to ``weight`` for these indices: each cluster's mean."""
        flat_indices = self.indices.flatten()
        sums = torch.zeros(self.clusters, dtype=weight.dtype).index_add_(
            0, flat_indices, weight.detach().flatten()
        )
        counts = torch.bincount(flat_indices, minlength=self.clusters).clamp(min=1)
        return sums / counts.to(weight.dtype)


def kmeans_indices(weight: torch.Tensor, clusters: int) -> torch.Tensor:
    """Each weight's cluster, k-means in one dimension from centroids spread evenly over
    [min, max] (Han et al.'s linear initialisation)."""
    values = weight.detach().flatten().numpy().reshape(-1, 1)
    initial = np.linspace(values.min(), values.max(), clusters, dtype=values.dtype)
    kmeans = KMeans(n_clusters=clusters, init=initial.reshape(-1, 1), n_init=1, random_state=0)
    labels = kmeans.fit_predict(values)
    return torch.from_numpy(labels.astype(np.int64)).reshape(weight.shape)


def clusterable_layers(model: nn.Module, min_weights: int) -> tuple[list[str], list[str]]:
    """(Conv/Linear layers clustered, those left dense as smaller than ``min_weights``)."""
    clustered, dense = [], []
    for name, module in model.named_modules():
        if isinstance(module, _CLUSTERABLE):
            (clustered if module.weight.numel() >= min_weights else dense).append(name)
    return clustered, dense


def share_weights(model: nn.Module, layers: Iterable[str], clusters: int) -> None:
    for name in layers:
        layer = model.get_submodule(name)
        indices = kmeans_indices(layer.weight, clusters)
        parametrize.register_parametrization(layer, "weight", SharedCodebook(indices, clusters))


def materialize_weights(model: nn.Module, layers: Iterable[str]) -> None:
    """Plain weights again, each ``codebook[indices]``. The codebooks' last gradients go first:
    the weight takes over the codebook's Parameter, whose gradient has the codebook's shape."""
    model.zero_grad(set_to_none=True)
    for name in layers:
        parametrize.remove_parametrizations(
            model.get_submodule(name), "weight", leave_parametrized=True
        )


# --- the storage container --------------------------------------------------------------------


def _pack_indices(indices: np.ndarray, bits: int) -> bytes:
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)
    bit_matrix = (indices.astype(np.uint16)[:, None] >> shifts) & 1
    return np.packbits(bit_matrix.astype(np.uint8)).tobytes()


def _unpack_indices(packed: bytes, count: int, bits: int) -> np.ndarray:
    bit_matrix = np.unpackbits(np.frombuffer(packed, np.uint8), count=count * bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return bit_matrix.reshape(count, bits).astype(np.int64) @ weights


def pack_storage(model: onnx.ModelProto, shared: Mapping[str, int]) -> bytes:
    """The container of every initializer of ``model``'s graph: those named in ``shared`` as a
    codebook of at most ``shared[name]`` entries and bit-packed indices, the rest raw."""
    entries: list[dict[str, Any]] = []
    payload: list[bytes] = []
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        little_endian = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        entry: dict[str, Any] = {
            "name": initializer.name,
            "shape": list(array.shape),
            "dtype": little_endian.dtype.str,
        }
        if initializer.name in shared:
            codebook, indices = np.unique(array.astype(np.float32), return_inverse=True)
            clusters = shared[initializer.name]
            if len(codebook) > clusters:
                raise CompressionError(
                    f"the exported graph's '{initializer.name}' holds {len(codebook)} distinct "
                    f"values, more than its {clusters} clusters"
                )
            bits = index_bits(clusters)
            entry.update(dtype="<f4", encoding="codebook", entries=len(codebook), bits=bits)
            payload.append(codebook.astype("<f4").tobytes())
            payload.append(_pack_indices(indices.reshape(-1), bits))
        else:
            entry["encoding"] = "raw"
            payload.append(little_endian.tobytes())
        entries.append(entry)
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return b"".join([STORAGE_MAGIC, _HEADER_LENGTH.pack(len(header)), header, *payload])


def unpack_storage(storage: bytes) -> dict[str, np.ndarray]:
    """Every tensor of a :func:`pack_storage` container, by initializer name."""
    if not storage.startswith(STORAGE_MAGIC):
        raise CompressionError("not a clustered-weights container (bad magic)")
    offset = len(STORAGE_MAGIC)
    (header_length,) = _HEADER_LENGTH.unpack_from(storage, offset)
    offset += _HEADER_LENGTH.size
    header = json.loads(storage[offset : offset + header_length])
    offset += header_length
    tensors = {}
    for entry in header["tensors"]:
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        count = math.prod(shape)
        if entry["encoding"] == "codebook":
            codebook = np.frombuffer(storage, dtype, entry["entries"], offset)
            offset += codebook.nbytes
            packed_length = math.ceil(count * entry["bits"] / 8)
            indices = _unpack_indices(
                storage[offset : offset + packed_length], count, entry["bits"]
            )
            offset += packed_length
            tensors[entry["name"]] = codebook[indices].reshape(shape)
        else:
            array = np.frombuffer(storage, dtype, count, offset)
            offset += array.nbytes
            tensors[entry["name"]] = array.reshape(shape)
    if offset != len(storage):
        left = len(storage) - offset
        raise CompressionError(f"clustered-weights container has {left} bytes past its tensors")
    return tensors


def _graph_weight_names(
    model: onnx.ModelProto, clustered: nn.Module, layers: Iterable[str]
) -> dict[str, str | None]:
    """Each clustered layer's weight initializer in the exported graph: by name, else by
    value (an exporter may rename or transpose it); None when the graph holds it only mixed
    into another tensor."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found: dict[str, str | None] = {}
    for layer in layers:
        weight = clustered.get_submodule(layer).weight.detach().numpy()
        name = f"{layer}.weight"
        if name not in arrays:
            name = next(
                (
                    candidate
                    for candidate, array in arrays.items()
                    if array.size == weight.size
                    and (
                        np.array_equal(array.reshape(weight.shape), weight)
                        or (array.ndim == 2 and np.array_equal(array.T, weight))
                    )
                ),
                None,
            )
        found[layer] = name
    return found


@register_technique(ClusteredConfig)
def cluster_weights(
    config: ClusteredConfig, model: nn.Module, inputs: TechniqueInput
) -> TransformedModel:
    """Exports the graph itself (Gearbox's standard export), because the storage it measures
    is a packing of that graph's initializers."""
    inputs.report("folding batch norms", 0.02)
    model.eval()
    folded = fold_batch_norms(model)
    layers, dense = clusterable_layers(model, config.min_weights)
    if not layers:
        raise InvalidArgumentError(
            f"no Conv/Linear layer of '{inputs.spec.name}' has at least {config.min_weights} "
            "weights to cluster; lower min_weights"
        )
    inputs.report(f"clustering {len(layers)} layers", 0.05)
    share_weights(model, layers, config.clusters)
    training = inputs.spec.training or TrainingConfig()
    epochs = default_finetune_epochs(training, config.finetune_epochs, 3)
    learning_rate = training.learning_rate * config.finetune_learning_rate_scale
    fine_tune(
        model,
        inputs.reference_model,
        inputs.spec,
        inputs.data.train,
        training,
        epochs,
        learning_rate,
        on_epoch=lambda done, total: inputs.report(
            f"fine-tuning shared weights, epoch {done}/{total}", 0.1 + 0.6 * done / total
        ),
    )
    materialize_weights(model, layers)

    inputs.report("exporting to ONNX", 0.72)
    exported = export_described(model, inputs.spec, inputs.data.heldout)
    graph = onnx.load_from_string(exported.onnx)
    in_graph = _graph_weight_names(graph, model, layers)
    inputs.report("packing codebooks", 0.8)
    storage = pack_storage(
        graph, {name: config.clusters for name in in_graph.values() if name is not None}
    )
    arrays = {t.name: t for t in graph.graph.initializer}
    unique_values = {
        layer: None if name is None else len(np.unique(numpy_helper.to_array(arrays[name])))
        for layer, name in in_graph.items()
    }
    return TransformedModel(
        model=model,
        details={
            "clusters": config.clusters,
            "bits_per_index": config.bits_per_index,
            "initialization": "linear over [min, max]",
            "folded_batch_norms": len(folded),
            "clustered_layers": layers,
            "dense_layers": dense,
            "unique_values_in_graph": unique_values,
            "finetune_epochs": epochs,
            "finetune_learning_rate": learning_rate,
            "served_bytes": len(exported.onnx),
            "storage_bytes": len(storage),
            "storage_ratio": round(len(exported.onnx) / len(storage), 2),
            "export": dict(exported.description),
        },
        storage_bytes=len(storage),
        onnx=exported.onnx,
    )
