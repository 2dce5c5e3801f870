"""Gearbox serving: the compressed variants of a model repository behind OIP v2 on Ray Serve.

Public entry points (everything else is internal and may change):

- :func:`start_gateway` / :func:`stop_gateway` — deploy the gateway on the Ray this process is
  connected to (what ``gearbox serve`` does); :class:`Endpoints` says where it listens.
- :class:`GatewayConfig`, :class:`BatchingConfig` — what a gateway serves and how it batches.
- :class:`Ingress`, :func:`ray_environment` — the ingress in front (HAProxy by default) and the
  Ray environment that selects it.
- :func:`build_app`, :func:`app_builder` — the Ray Serve application, for ``serve run`` or a
  Serve config file.

Where things live: a request enters at ``app.Gateway`` (``rest/`` and ``grpc/`` convert the wire
formats); ``dataplane`` implements every endpoint once; ``router`` chooses the variant from
``queue_model``'s predictions; ``executor`` runs ONNX Runtime on worker threads per device class;
``clock`` starts the budget's clock where the request arrives; ``metrics`` owns the Prometheus
series.
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved lazily (PEP 562): importing the package must not pull in Ray Serve or ONNX Runtime.
_EXPORTS: dict[str, str] = {
    "BatchingConfig": "config",
    "GatewayConfig": "config",
    "Ingress": "ingress",
    "ray_environment": "ingress",
    "Endpoints": "server",
    "start_gateway": "server",
    "stop_gateway": "server",
    "app_builder": "app",
    "build_app": "app",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gearbox.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gearbox.serving.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BatchingConfig",
    "Endpoints",
    "GatewayConfig",
    "Ingress",
    "app_builder",
    "build_app",
    "ray_environment",
    "start_gateway",
    "stop_gateway",
]
