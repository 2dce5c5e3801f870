"""What the gateway serves: a snapshot of the model repository, with the variants this gateway
cannot serve (they failed to load, or their model was unloaded) marked as such.

A replica reads one at start and a new one on each repository update
(:mod:`gearbox.serving.repository_control`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gearbox.compression.repository import ModelRecord, ModelRepository, VariantManifest
from gearbox.serving.queue_model import BatchCost


@dataclass(frozen=True)
class CatalogEntry:
    record: ModelRecord
    manifests: Mapping[str, VariantManifest]
    """Every published variant, rejected ones included (to say why they are not served)."""
    tokenizer: bytes | None = None
    """A text model's ``tokenizer.json``, verified against ``model.json``."""
    unavailable: Mapping[str, str] = field(default_factory=dict)
    """Ready variants this gateway does not serve, and why (an artifact that failed its sha256
    or would not load, a model unloaded on request)."""

    @property
    def ready(self) -> tuple[str, ...]:
        """The variants served: ready at compression and not unavailable here."""
        return tuple(
            name
            for name, manifest in sorted(self.manifests.items())
            if manifest.is_ready and name not in self.unavailable
        )


@dataclass(frozen=True)
class Catalog:
    """A snapshot of the model repository as the gateway serves it."""

    models: Mapping[str, CatalogEntry]

    @classmethod
    def load(cls, repository: ModelRepository) -> Catalog:
        entries = {}
        for name in repository.models():
            manifests = {m.variant: m for m in repository.variants(name)}
            record = repository.model(name)
            tokenizer = repository.read_tokenizer(record) if record.text is not None else None
            entries[name] = CatalogEntry(record, manifests, tokenizer)
        return cls(entries)

    def ready_manifests(self) -> list[VariantManifest]:
        return [
            entry.manifests[variant] for entry in self.models.values() for variant in entry.ready
        ]

    def with_unavailable(self, reasons: Mapping[tuple[str, str], str]) -> Catalog:
        """This catalog with each (model, variant) of ``reasons`` left out of service, and why."""
        entries = dict(self.models)
        for (model, variant), reason in reasons.items():
            entry = entries.get(model)
            if entry is not None and variant in entry.manifests:
                unavailable = {**entry.unavailable, variant: reason}
                entries[model] = dataclasses.replace(entry, unavailable=unavailable)
        return Catalog(entries)

    def without_models(self, models: Iterable[str], reason: str) -> Catalog:
        """This catalog with every variant of ``models`` left out of service for ``reason``."""
        return self.with_unavailable(
            {
                (model, variant): reason
                for model in models
                if model in self.models
                for variant in self.models[model].ready
            }
        )


def profiled_costs_by_tokens(manifest: VariantManifest, device_class: str) -> dict[int, BatchCost]:
    """A text model's batch cost at each profiled sequence length on ``device_class`` (empty for
    a model profiled at one input size): ``latency_ms[device][batch]["tokens"][length]``."""
    profile = manifest.latency_ms.get(device_class, {})
    b1 = profile.get("1", {}).get("tokens", {})
    b8 = profile.get("8", {}).get("tokens", {})
    return {
        int(length): BatchCost.from_profile(
            float(figures["p50"]), float(b8[length]["p50"]) if length in b8 else None
        )
        for length, figures in b1.items()
    }


def profiled_cost(manifest: VariantManifest, device_class: str) -> BatchCost:
    """The manifest's batch cost on ``device_class``; the fastest profiled class otherwise.

    An unprofiled class starts from the best figure known and is corrected by live measurements
    (and the warm-up) before it matters.
    """
    profile = manifest.latency_ms.get(device_class)
    if profile is None or "1" not in profile:
        known = [p for p in manifest.latency_ms.values() if "1" in p]
        if not known:
            return BatchCost(0.0, 0.0)
        profile = min(known, key=lambda p: float(p["1"]["p50"]))
    b8 = profile.get("8")
    return BatchCost.from_profile(
        float(profile["1"]["p50"]), float(b8["p50"]) if b8 is not None else None
    )
