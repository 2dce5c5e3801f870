"""Compression techniques: one ``<Name>Config`` dataclass and one registered handler each.

``apply_technique(config, inputs)`` applies any of them, or a :class:`ComposedConfig` of
several. A recipe is a named config: the variant name a user asks for on the command line.
Each technique lives in its own module here.
"""

from __future__ import annotations

from collections.abc import Sequence

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
from gearbox.compression.techniques.clustered import ClusteredConfig
from gearbox.compression.techniques.composed import ComposedConfig
from gearbox.compression.techniques.distilled import DistilledConfig
from gearbox.compression.techniques.fp32 import Fp32Config
from gearbox.compression.techniques.int8 import Int8Config
from gearbox.compression.techniques.lowrank import LowRankConfig
from gearbox.compression.techniques.params import (
    PARAMS_SCHEMA_VERSION,
    config_from_mapping,
    config_from_params,
    config_to_params,
    override,
)
from gearbox.compression.techniques.pruned import PrunedConfig
from gearbox.compression.techniques.qat import QatConfig
from gearbox.compression.techniques.registry import (
    apply_technique,
    config_type_for,
    register_technique,
    registered_config_types,
)
from gearbox.compression.techniques.sparse import SparseConfig

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
    QatConfig(),
    LowRankConfig(),
    ClusteredConfig(),
    SparseConfig(),
    Int8Config(name="distilled-int8", parent="distilled"),
    Int8Config(name="pruned-int8", parent="pruned"),
    ComposedConfig(steps=(PrunedConfig(), DistilledConfig(), Int8Config())),
)


def resolve_recipes(
    names: str | None, extra: Sequence[TechniqueConfig] = ()
) -> tuple[TechniqueConfig, ...]:
    """Turn ``a,b,c`` / ``all`` / ``None`` (core) into configs, plus ``extra`` configs (from a
    recipe file); the reference and every parent a config transforms are added, parents
    first."""
    known = {recipe.name: recipe for recipe in (*ALL_RECIPES, *extra)}
    if names is None or names.strip() == "":
        wanted = [] if extra else [recipe.name for recipe in CORE_RECIPES]
    elif names.strip() == "all":
        wanted = [recipe.name for recipe in ALL_RECIPES]
    else:
        wanted = [name.strip() for name in names.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise InvalidArgumentError(
                f"unknown variant {', '.join(repr(n) for n in unknown)} "
                f"(known: {', '.join(known)}, or 'all')"
            )
    return with_dependencies([known[name] for name in [*wanted, *(r.name for r in extra)]])


def with_dependencies(configs: Sequence[TechniqueConfig]) -> tuple[TechniqueConfig, ...]:
    """``configs`` with the reference and every parent they transform, parents first.
    A parent that is not among them must be one of Gearbox's own recipes."""
    chosen: dict[str, TechniqueConfig] = {}
    by_name = {recipe.name: recipe for recipe in ALL_RECIPES}
    by_name.update({config.name: config for config in configs})

    def add(config: TechniqueConfig, path: tuple[str, ...]) -> None:
        if config.name in chosen:
            return
        if config.name in path:
            raise InvalidArgumentError(f"variant '{config.name}' is its own ancestor")
        if config.stage is Stage.ARTIFACT and config.parent is not None:
            parent = by_name.get(config.parent)
            if parent is None:
                raise InvalidArgumentError(
                    f"variant '{config.name}' transforms '{config.parent}', which is neither "
                    "asked for nor one of Gearbox's recipes"
                )
            add(parent, (*path, config.name))
        chosen[config.name] = config

    # The reference variant anchors the accuracy gate, so it is always built, and first.
    add(by_name[REFERENCE_VARIANT], ())
    for config in configs:
        add(config, ())
    return tuple(chosen.values())


__all__ = [
    "ALL_RECIPES",
    "CORE_RECIPES",
    "PARAMS_SCHEMA_VERSION",
    "REFERENCE_VARIANT",
    "ClusteredConfig",
    "ComposedConfig",
    "CompressedModel",
    "DistilledConfig",
    "Fp32Config",
    "Int8Config",
    "LowRankConfig",
    "ProgressFn",
    "PrunedConfig",
    "QatConfig",
    "SparseConfig",
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
    "with_dependencies",
]
