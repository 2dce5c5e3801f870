"""Compression techniques: one ``<Name>Config`` dataclass and one registered handler each.

``apply_technique(config, inputs)`` applies any of them, or a :class:`ComposedConfig` of
several. A recipe is a named config: the variant name a user asks for on the command line.
Each technique lives in its own module here.
"""

from __future__ import annotations

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.techniques.base import (
    CompressedModel,
    ProgressFn,
    Stage,
    TechniqueConfig,
    TechniqueInput,
    TransformedArtifact,
    TransformedModel,
)
from gearbox.compression.techniques.composed import ComposedConfig
from gearbox.compression.techniques.distilled import DistilledConfig
from gearbox.compression.techniques.fp32 import Fp32Config
from gearbox.compression.techniques.int8 import Int8Config
from gearbox.compression.techniques.params import (
    PARAMS_SCHEMA_VERSION,
    config_from_mapping,
    config_from_params,
    config_to_params,
    override,
)
from gearbox.compression.techniques.pruned import PrunedConfig
from gearbox.compression.techniques.registry import (
    apply_technique,
    config_type_for,
    register_technique,
    registered_config_types,
)

REFERENCE_VARIANT = "fp32"

CORE_RECIPES: tuple[TechniqueConfig, ...] = (
    Fp32Config(),
    Int8Config(),
    PrunedConfig(),
    DistilledConfig(),
)
ALL_RECIPES: tuple[TechniqueConfig, ...] = (
    *CORE_RECIPES,
    Int8Config(name="int8-static", mode="static"),
    Int8Config(name="distilled-int8", parent="distilled"),
    Int8Config(name="pruned-int8", parent="pruned"),
    ComposedConfig(steps=(PrunedConfig(), DistilledConfig(), Int8Config())),
)


def resolve_recipes(names: str | None) -> tuple[TechniqueConfig, ...]:
    """Turn ``a,b,c`` / ``all`` / ``None`` (core) into configs, parents included and first."""
    if names is None or names.strip() == "":
        return CORE_RECIPES
    if names.strip() == "all":
        return ALL_RECIPES
    by_name = {recipe.name: recipe for recipe in ALL_RECIPES}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise InvalidArgumentError(
            f"unknown variant {', '.join(repr(n) for n in unknown)} "
            f"(known: {', '.join(by_name)}, or 'all')"
        )
    # The reference variant anchors the accuracy gate; transformed parents must be built too.
    chosen = {REFERENCE_VARIANT, *wanted}
    for name in list(chosen):
        parent = by_name[name].parent
        while parent is not None:
            chosen.add(parent)
            parent = by_name[parent].parent
    return tuple(recipe for recipe in ALL_RECIPES if recipe.name in chosen)


__all__ = [
    "ALL_RECIPES",
    "CORE_RECIPES",
    "PARAMS_SCHEMA_VERSION",
    "REFERENCE_VARIANT",
    "ComposedConfig",
    "CompressedModel",
    "DistilledConfig",
    "Fp32Config",
    "Int8Config",
    "ProgressFn",
    "PrunedConfig",
    "Stage",
    "TechniqueConfig",
    "TechniqueInput",
    "TransformedArtifact",
    "TransformedModel",
    "apply_technique",
    "config_from_mapping",
    "config_from_params",
    "config_to_params",
    "config_type_for",
    "override",
    "register_technique",
    "registered_config_types",
    "resolve_recipes",
]
