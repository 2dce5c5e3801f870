"""Recipe files and ``--set``: choosing variants and their parameters without editing code.

A recipe file (YAML) lists the variants to build, each either the name of one of Gearbox's
recipes or a full config, and may set single parameters::

    variants:
      - fp32
      - distilled
      - name: pruned-70
        technique: prune
        amount: 0.7
      - technique: compose          # named after its steps: lowrank-int8
        steps: [{technique: lowrank}, {technique: quantize}]
    set:
      distilled.epochs: 20

``--set VARIANT.PARAM=VALUE`` on the command line does what ``set`` does, after the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.techniques import (
    ALL_RECIPES,
    TechniqueConfig,
    config_from_mapping,
    override,
    with_dependencies,
)


class RecipeFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    variants: list[str | dict[str, Any]] = pydantic.Field(min_length=1)
    set: dict[str, Any] = pydantic.Field(default_factory=dict)


def load_recipe_file(path: str | Path) -> tuple[tuple[TechniqueConfig, ...], list[str]]:
    """The variants a recipe file asks for, and its ``set`` entries as ``NAME.PARAM=VALUE``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read recipe file {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"recipe file {path} is not valid YAML: {exc}") from exc
    try:
        recipe = RecipeFile.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'file'}: {error['msg']}"
            for error in exc.errors()
        )
        raise InvalidArgumentError(f"recipe file {path}: {problems}") from exc
    known = {config.name: config for config in ALL_RECIPES}
    configs: list[TechniqueConfig] = []
    for index, entry in enumerate(recipe.variants):
        where = f"recipe file {path}, variant {index + 1}"
        if isinstance(entry, str):
            if entry not in known:
                raise InvalidArgumentError(
                    f"{where}: unknown variant '{entry}' (known: {', '.join(known)})"
                )
            configs.append(known[entry])
        else:
            configs.append(config_from_mapping(entry, where))
    settings = [f"{key}={_yaml_text(value)}" for key, value in recipe.set.items()]
    return tuple(configs), settings


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def apply_settings(
    recipes: Sequence[TechniqueConfig], settings: Sequence[str]
) -> tuple[TechniqueConfig, ...]:
    """``recipes`` with each ``VARIANT.PARAM=VALUE`` applied, parents brought in again in
    case a setting changed one."""
    by_name: dict[str, TechniqueConfig] = {config.name: config for config in recipes}
    for setting in settings:
        target, equals, value = setting.partition("=")
        variant, dot, parameter = target.strip().partition(".")
        if not equals or not dot or not parameter:
            raise InvalidArgumentError(
                f"--set '{setting}' is not VARIANT.PARAM=VALUE (e.g. distilled.epochs=20)"
            )
        if variant not in by_name:
            raise InvalidArgumentError(
                f"--set '{setting}': variant '{variant}' is not being built "
                f"(building: {', '.join(by_name)})"
            )
        by_name[variant] = override(by_name[variant], parameter, value.strip())
    return with_dependencies(list(by_name.values()))
