"""A config as the manifest's ``params`` and back, and overrides of single parameters.

``params`` is the full config (every field, defaults included) with the technique's name and a
schema version, so that a variant can be rebuilt from its manifest alone:
``config_from_params(manifest.params)`` gives back an equal config.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any

import pydantic
import yaml

from gearbox.compression.errors import GearboxError, InvalidArgumentError
from gearbox.compression.techniques.base import TechniqueConfig
from gearbox.compression.techniques.composed import ComposedConfig
from gearbox.compression.techniques.registry import config_type_for

PARAMS_SCHEMA_VERSION = 1


def config_to_params(config: TechniqueConfig) -> dict[str, Any]:
    return {"schema_version": PARAMS_SCHEMA_VERSION, **_config_json(config)}


def _config_json(config: TechniqueConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {"technique": config.technique}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(config, ComposedConfig) and field.name == "steps":
            value = [_config_json(step) for step in value]
        fields[field.name] = value
    return fields


def config_from_params(params: Mapping[str, Any]) -> TechniqueConfig:
    """The config a manifest's ``params`` describe; one clear error for anything else."""
    if not isinstance(params, Mapping):
        raise InvalidArgumentError(f"params must be a mapping, not {type(params).__name__}")
    version = params.get("schema_version")
    if version != PARAMS_SCHEMA_VERSION:
        raise InvalidArgumentError(
            f"params schema version {version!r} is not the one this Gearbox reads "
            f"({PARAMS_SCHEMA_VERSION})"
        )
    return config_from_mapping({k: v for k, v in params.items() if k != "schema_version"})


def config_from_mapping(fields: Mapping[str, Any], where: str = "config") -> TechniqueConfig:
    """Build a config from ``{"technique": ..., field: value, ...}``; fields left out keep
    their defaults. Values are checked against the field's type."""
    if not isinstance(fields, Mapping):
        raise InvalidArgumentError(f"{where} must be a mapping, not {type(fields).__name__}")
    technique = fields.get("technique")
    if not isinstance(technique, str):
        raise InvalidArgumentError(f"{where} needs a 'technique' name")
    config_type = config_type_for(technique)
    known = _field_types(config_type)
    unknown = sorted(set(fields) - set(known) - {"technique"})
    if unknown:
        raise InvalidArgumentError(
            f"{where}: technique '{technique}' has no parameter {', '.join(unknown)} "
            f"(known: {', '.join(known)})"
        )
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "technique":
            continue
        if config_type is ComposedConfig and name == "steps":
            if not isinstance(value, list | tuple):
                raise InvalidArgumentError(f"{where}: steps must be a list of configs")
            values[name] = tuple(
                config_from_mapping(step, f"{where}, step {i + 1}") for i, step in enumerate(value)
            )
        else:
            values[name] = _validated(known[name], value, f"{where}: {technique}.{name}")
    try:
        return config_type(**values)
    except GearboxError as exc:
        raise InvalidArgumentError(f"{where}: {exc.message}") from exc
    except TypeError as exc:
        raise InvalidArgumentError(f"{where}: {exc}") from exc


def override(config: TechniqueConfig, parameter: str, text: str) -> TechniqueConfig:
    """``config`` with one parameter set from its command-line text (read as YAML: ``5``,
    ``0.3``, ``none``, ``[a, b]``). A composed recipe's steps are named ``step.param``."""
    if isinstance(config, ComposedConfig):
        step_name, dot, rest = parameter.partition(".")
        names = [step.name for step in config.steps]
        if not dot or step_name not in names:
            raise InvalidArgumentError(
                f"'{config.name}' is a composed recipe: set '{config.name}.STEP.PARAM' "
                f"with STEP one of {', '.join(names)}"
            )
        steps = tuple(
            override(step, rest, text) if step.name == step_name else step for step in config.steps
        )
        return dataclasses.replace(config, steps=steps)
    try:
        value = None if text.strip().lower() == "none" else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"cannot read the value '{text}': {exc}") from exc
    fields = _config_json(config)
    if parameter not in fields or parameter in ("technique", "name"):
        known = ", ".join(name for name in fields if name not in ("technique", "name"))
        raise InvalidArgumentError(
            f"variant '{config.name}' ({config.technique}) has no parameter '{parameter}' "
            f"(known: {known})"
        )
    fields[parameter] = value
    return config_from_mapping(fields, f"variant '{config.name}'")


@functools.cache
def _field_types(config_type: type[TechniqueConfig]) -> dict[str, Any]:
    hints = typing.get_type_hints(config_type)
    return {field.name: hints[field.name] for field in dataclasses.fields(config_type)}


@functools.cache
def _adapter(annotation: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(annotation)


def _validated(annotation: Any, value: Any, where: str) -> Any:
    try:
        return _adapter(annotation).validate_python(value, strict=False)
    except pydantic.ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise InvalidArgumentError(f"{where}: {problem} (got {value!r})") from exc
