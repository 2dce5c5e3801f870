"""What the gateway serves: a snapshot of the model repository, read once per replica."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gearbox.compression.repository import ModelRecord, ModelRepository, VariantManifest
from gearbox.serving.queue_model import BatchCost


@dataclass(frozen=True)
class CatalogEntry:
    record: ModelRecord
    manifests: Mapping[str, VariantManifest]
    """Every published variant, rejected ones included (to say why they are not served)."""
    tokenizer: bytes | None = None
    """A text model's ``tokenizer.json``, verified against ``model.json``."""

    @property
    def ready(self) -> tuple[str, ...]:
        return tuple(name for name, m in sorted(self.manifests.items()) if m.is_ready)


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
