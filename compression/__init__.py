"""Gearbox compression: register a model, compress it into variants on Ray, publish them.

Public entry points:

- :class:`ModelSpec` and :func:`load_spec` — what a user registers.
- :func:`compress` — build, evaluate, gate and publish variants on a Ray cluster.
- :func:`apply_technique` and the ``*Config`` classes — one technique, no Ray needed.
- :class:`ModelRepository` — the published variants and their manifests.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve lazily (PEP 562) so that the serving replicas, which need only the repository,
# signatures and device classes, never import torch and the training stack.
_EXPORTS: dict[str, str] = {
    "CPU": "devices",
    "DEFAULT_DEVICE_CLASSES": "devices",
    "DeviceClass": "devices",
    "load_device_classes": "devices",
    "CompressionError": "errors",
    "ErrorCode": "errors",
    "GearboxError": "errors",
    "IntegrityError": "errors",
    "InvalidArgumentError": "errors",
    "NotFoundError": "errors",
    "RepositoryError": "errors",
    "ResourceExhaustedError": "errors",
    "UnavailableError": "errors",
    "CompressionReport": "pipeline",
    "compress": "pipeline",
    "ray_session": "cluster",
    "ModelRecord": "repository",
    "ModelRepository": "repository",
    "VariantManifest": "repository",
    "Signature": "signature",
    "TensorSpec": "signature",
    "DataSplits": "spec",
    "ModelSpec": "spec",
    "Split": "spec",
    "TrainingConfig": "spec",
    "load_spec": "spec",
    "ALL_RECIPES": "techniques",
    "CORE_RECIPES": "techniques",
    "ClusteredConfig": "techniques",
    "ComposedConfig": "techniques",
    "DistilledConfig": "techniques",
    "Fp32Config": "techniques",
    "Int8Config": "techniques",
    "LowRankConfig": "techniques",
    "QatConfig": "techniques",
    "SparseConfig": "techniques",
    "PrunedConfig": "techniques",
    "TechniqueConfig": "techniques",
    "apply_technique": "techniques",
    "resolve_recipes": "techniques",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gearbox.compression' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gearbox.compression.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


EXAMPLES = {
    "digits": "gearbox.compression.examples.digits:spec",
    "minilm": "gearbox.compression.examples.minilm:spec",
}

__all__ = [
    "ALL_RECIPES",
    "CORE_RECIPES",
    "CPU",
    "DEFAULT_DEVICE_CLASSES",
    "EXAMPLES",
    "ClusteredConfig",
    "ComposedConfig",
    "CompressionError",
    "CompressionReport",
    "DataSplits",
    "DeviceClass",
    "DistilledConfig",
    "ErrorCode",
    "Fp32Config",
    "GearboxError",
    "Int8Config",
    "IntegrityError",
    "InvalidArgumentError",
    "LowRankConfig",
    "ModelRecord",
    "ModelRepository",
    "ModelSpec",
    "NotFoundError",
    "PrunedConfig",
    "QatConfig",
    "RepositoryError",
    "ResourceExhaustedError",
    "Signature",
    "SparseConfig",
    "Split",
    "TechniqueConfig",
    "TensorSpec",
    "TrainingConfig",
    "UnavailableError",
    "VariantManifest",
    "apply_technique",
    "compress",
    "load_device_classes",
    "load_spec",
    "ray_session",
    "resolve_recipes",
]
