"""A tiny model trained once per test session, and techniques applied to it once each.

The fixtures ``conv_case`` and ``mlp_case`` (tests/unit/conftest.py) give every technique's
tests the same trained references, so each trains once per session.
"""

from __future__ import annotations

import torch
from torch import nn

from gearbox.compression import Fp32Config, ModelSpec, TechniqueConfig, apply_technique
from gearbox.compression.techniques import CompressedModel, TechniqueInput
from gearbox.compression.training import fit


class TrainedCase:
    """A spec, its data and its trained reference model; configs applied once each, with the
    progress each reported kept by config."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.data = spec.load_data()
        torch.manual_seed(0)  # the factory's initial weights come from the global generator
        self.model = spec.build_model()
        fit(self.model, spec, self.data.train, spec.training)
        self._results: dict[TechniqueConfig, CompressedModel] = {}
        self.progress: dict[TechniqueConfig, list[tuple[str, float]]] = {}

    def inputs(
        self, config: TechniqueConfig | None = None, reference: nn.Module | None = None
    ) -> TechniqueInput:
        """Inputs for ``config`` (its parent's artifact when it transforms ``fp32``), from
        ``reference`` instead of the trained model where a test prepares its own."""
        parent = self.apply(Fp32Config()) if config and config.parent == "fp32" else None
        stages = self.progress.setdefault(config, []) if config else []
        return TechniqueInput(
            spec=self.spec,
            data=self.data,
            reference_model=self.model if reference is None else reference,
            parent_artifact=None if parent is None else parent.onnx,
            parent_param_count=None if parent is None else parent.param_count,
            report=lambda stage, fraction: stages.append((stage, fraction)),
        )

    def apply(self, config: TechniqueConfig) -> CompressedModel:
        if config not in self._results:
            self._results[config] = apply_technique(config, self.inputs(config))
        return self._results[config]
