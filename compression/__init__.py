"""Gearbox compression: register a model, compress it into variants on Ray, publish them.

Public entry points:

- :class:`ModelSpec` and :func:`load_spec` — what a user registers.
- :func:`compress` — build, evaluate, gate and publish variants on a Ray cluster.
- :func:`apply_technique` and the ``*Config`` classes — one technique, no Ray needed.
- :class:`ModelRepository` — the published variants and their manifests.
"""

from gearbox.compression.devices import CPU, DEFAULT_DEVICE_CLASSES, DeviceClass
from gearbox.compression.errors import (
    CompressionError,
    ErrorCode,
    GearboxError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    RepositoryError,
    UnavailableError,
)
from gearbox.compression.pipeline import CompressionReport, compress, ray_session
from gearbox.compression.repository import ModelRecord, ModelRepository, VariantManifest
from gearbox.compression.signature import Signature, TensorSpec
from gearbox.compression.spec import DataSplits, ModelSpec, Split, TrainingConfig, load_spec
from gearbox.compression.techniques import (
    ALL_RECIPES,
    CORE_RECIPES,
    DistilledConfig,
    Fp32Config,
    Int8Config,
    PrunedConfig,
    TechniqueConfig,
    apply_technique,
    resolve_recipes,
)

EXAMPLES = {"digits": "gearbox.compression.examples.digits:spec"}

__all__ = [
    "ALL_RECIPES",
    "CORE_RECIPES",
    "CPU",
    "DEFAULT_DEVICE_CLASSES",
    "EXAMPLES",
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
    "ModelRecord",
    "ModelRepository",
    "ModelSpec",
    "NotFoundError",
    "PrunedConfig",
    "RepositoryError",
    "Signature",
    "Split",
    "TechniqueConfig",
    "TensorSpec",
    "TrainingConfig",
    "UnavailableError",
    "VariantManifest",
    "apply_technique",
    "compress",
    "load_spec",
    "ray_session",
    "resolve_recipes",
]
