"""The technique registry and the one public entry point that applies any config."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from gearbox.compression.errors import CompressionError, InvalidArgumentError
from gearbox.compression.onnx_export import export_described
from gearbox.compression.surgery import count_parameters
from gearbox.compression.techniques.base import (
    CompressedModel,
    Stage,
    TechniqueConfig,
    TechniqueInput,
    TransformedArtifact,
    TransformedModel,
)
from gearbox.compression.techniques.composed import ComposedConfig

ConfigT = TypeVar("ConfigT", bound=TechniqueConfig)
ModelHandler = Callable[[Any, nn.Module, TechniqueInput], TransformedModel]
ArtifactHandler = Callable[[Any, bytes, TechniqueInput], TransformedArtifact]
Handler = ModelHandler | ArtifactHandler

_HANDLERS: dict[type[TechniqueConfig], Handler] = {}


def register_technique(config_type: type[ConfigT]) -> Callable[[Handler], Handler]:
    """Register the handler that applies configs of ``config_type``.

    A model technique's handler is ``(config, model, inputs) -> TransformedModel``; it may
    change ``model`` in place (it is the handler's own copy). An artifact technique's is
    ``(config, onnx_bytes, inputs) -> TransformedArtifact``.
    """

    def decorator(handler: Handler) -> Handler:
        if config_type in _HANDLERS:
            raise ValueError(f"a handler for {config_type.__name__} is already registered")
        if any(known.technique == config_type.technique for known in _HANDLERS):
            raise ValueError(f"technique name '{config_type.technique}' is already taken")
        _HANDLERS[config_type] = handler
        return handler

    return decorator


def registered_config_types() -> tuple[type[TechniqueConfig], ...]:
    return tuple(_HANDLERS)


def config_type_for(technique: str) -> type[TechniqueConfig]:
    """The config class of a technique name (``prune``, ``quantize``, ``compose``, ...)."""
    for config_type in (*_HANDLERS, ComposedConfig):
        if config_type.technique == technique:
            return config_type
    known = ", ".join(sorted(t.technique for t in (*_HANDLERS, ComposedConfig)))
    raise InvalidArgumentError(f"unknown technique '{technique}' (known: {known})")


def _handler(config: TechniqueConfig) -> Handler:
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise InvalidArgumentError(f"no technique is registered for {type(config).__name__}")
    return handler


def _export(model: nn.Module, inputs: TechniqueInput) -> tuple[bytes, dict[str, Any]]:
    exported = export_described(model, inputs.spec, inputs.data.heldout)
    return exported.onnx, dict(exported.description)


def apply_technique(config: TechniqueConfig, inputs: TechniqueInput) -> CompressedModel:
    """Apply any registered technique config, or a :class:`ComposedConfig`, to ``inputs``."""
    steps = config.steps if isinstance(config, ComposedConfig) else (config,)
    for step in steps:
        _handler(step)
    if not isinstance(config, ComposedConfig) and config.stage is Stage.ARTIFACT:
        if config.parent is None or inputs.parent_artifact is None:
            raise InvalidArgumentError(
                f"variant '{config.name}' transforms variant '{config.parent}', "
                "whose artifact is missing"
            )
        result = _handler(config)(config, inputs.parent_artifact, inputs)
        return CompressedModel(
            onnx=result.onnx,
            param_count=inputs.parent_param_count or 0,
            details=dict(result.details),
        )

    model = copy.deepcopy(inputs.reference_model)
    details: dict[str, Any] = {}
    own_export: bytes | None = None
    storage_bytes: int | None = None
    done: list[str] = []
    model_steps = [step for step in steps if step.stage is Stage.MODEL]
    for step in model_steps:
        if own_export is not None:
            raise CompressionError(
                f"step '{done[-1]}' exports its own graph, so no model step may follow it"
            )
        step_inputs = dataclasses.replace(inputs, steps_before=tuple(done))
        transformed = _handler(step)(step, model, step_inputs)
        model, own_export = transformed.model, transformed.onnx
        storage_bytes = transformed.storage_bytes
        details[step.name] = dict(transformed.details)
        done.append(step.name)
    param_count = count_parameters(model)
    inputs.report("exporting to ONNX", 0.85 if len(steps) == 1 else 0.6)
    if own_export is None:
        artifact, export_details = _export(model, inputs)
        details["export"] = export_details
    else:
        artifact = own_export
    for step in steps[len(model_steps) :]:
        step_inputs = dataclasses.replace(inputs, steps_before=tuple(done))
        quantized = _handler(step)(step, artifact, step_inputs)
        artifact = quantized.onnx
        storage_bytes = None
        details[step.name] = dict(quantized.details)
        done.append(step.name)
    if not isinstance(config, ComposedConfig):
        # One technique: its own details at the top, beside how the graph was exported.
        own = details.pop(config.name, {})
        details = {**own, **details}
    return CompressedModel(
        onnx=artifact, param_count=param_count, details=details, storage_bytes=storage_bytes
    )
