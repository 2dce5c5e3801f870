"""The technique registry and the one public entry point that applies any config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.techniques.base import CompressedModel, TechniqueConfig, TechniqueInput

Handler = Callable[[TechniqueConfig, TechniqueInput], CompressedModel]
ConfigT = TypeVar("ConfigT", bound=TechniqueConfig)

_HANDLERS: dict[type[TechniqueConfig], Handler] = {}


def register_technique(
    config_type: type[ConfigT],
) -> Callable[[Callable[[ConfigT, TechniqueInput], CompressedModel]], Handler]:
    """Register the handler that applies configs of ``config_type``."""

    def decorator(handler: Callable[[ConfigT, TechniqueInput], CompressedModel]) -> Handler:
        if config_type in _HANDLERS:
            raise ValueError(f"a handler for {config_type.__name__} is already registered")
        _HANDLERS[config_type] = handler  # type: ignore[assignment]
        return handler  # type: ignore[return-value]

    return decorator


def apply_technique(config: TechniqueConfig, inputs: TechniqueInput) -> CompressedModel:
    """Apply any registered technique config to ``inputs``."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise InvalidArgumentError(f"no technique is registered for {type(config).__name__}")
    if config.parent is not None and inputs.parent_artifact is None:
        raise InvalidArgumentError(
            f"variant '{config.name}' transforms variant '{config.parent}', "
            "whose artifact is missing"
        )
    return handler(config, inputs)


def registered_config_types() -> tuple[type[TechniqueConfig], ...]:
    return tuple(_HANDLERS)
