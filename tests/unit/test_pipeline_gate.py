import numpy as np
import pytest

from gearbox.compression import (
    DistilledConfig,
    Fp32Config,
    Int8Config,
    ModelRecord,
    ModelRepository,
    PrunedConfig,
)
from gearbox.compression.evaluation import Evaluation
from gearbox.compression.pipeline import VariantBuild, _gate
from gearbox.compression.repository import sha256_hex
from gearbox.compression.techniques import CompressedModel, config_from_params
from tests.unit.tiny_model import conv_spec

SPEC = conv_spec()
REFERENCE_OUTPUTS = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]
LATENCY = {"cpu": {"1": {"p50": 0.5, "p95": 0.7}, "8": {"p50": 1.0, "p95": 1.4}}}


def build(config, quality, outputs=REFERENCE_OUTPUTS, artifact=None, param_count=100):
    artifact = artifact if artifact is not None else f"onnx bytes of {config.name}".encode()
    return VariantBuild(
        config=config,
        compressed=CompressedModel(
            onnx=artifact, param_count=param_count, details={"technique_param": 1}
        ),
        evaluation=Evaluation(quality=quality, outputs=outputs),
        node="host-a/0123456789ab",
        seconds=12.3456,
    )


REFERENCE = build(Fp32Config(), quality=0.9)


def test_reference_passes_its_own_gate_and_has_no_parent():
    manifest = _gate(REFERENCE, LATENCY, REFERENCE, SPEC, max_accuracy_drop=0.02)
    assert manifest.status == "ready"
    assert manifest.reason is None
    assert manifest.parent is None
    assert manifest.variant == "fp32"
    assert manifest.technique == "export"
    assert manifest.quality.value == manifest.quality.reference == 0.9
    assert manifest.quality.agreement == 1.0


def test_a_variant_losing_more_than_the_gate_allows_is_rejected():
    int8 = build(Int8Config(), quality=0.85)
    manifest = _gate(int8, LATENCY, REFERENCE, SPEC, max_accuracy_drop=0.02)
    assert manifest.status == "rejected"
    assert not manifest.is_ready
    assert manifest.reason == (
        "accuracy 0.8500 is 0.0500 below the reference 0.9000; the gate allows 0.0200"
    )


@pytest.mark.parametrize("quality", [0.89, 0.9, 0.95])
def test_a_variant_within_the_gate_is_ready(quality):
    manifest = _gate(
        build(PrunedConfig(), quality), LATENCY, REFERENCE, SPEC, max_accuracy_drop=0.02
    )
    assert manifest.status == "ready"
    assert manifest.reason is None
    assert manifest.quality.value == quality
    assert manifest.quality.reference == 0.9


def test_a_wider_gate_accepts_a_larger_drop():
    manifest = _gate(build(Int8Config(), 0.85), LATENCY, REFERENCE, SPEC, max_accuracy_drop=0.1)
    assert manifest.status == "ready"


def test_agreement_is_computed_against_the_reference_outputs():
    outputs = REFERENCE_OUTPUTS.copy()
    outputs[[1, 6]] = np.eye(4, dtype=np.float32)[3]  # two of eight rows change their top-1
    manifest = _gate(build(DistilledConfig(), 0.9, outputs), LATENCY, REFERENCE, SPEC, 0.02)
    assert manifest.quality.agreement == 0.75
    assert manifest.quality.metric == "accuracy"


@pytest.mark.parametrize(
    ("config", "technique"),
    [(Int8Config(), "quantize"), (PrunedConfig(), "prune"), (DistilledConfig(), "distill")],
)
def test_non_reference_variants_name_fp32_as_parent(config, technique):
    manifest = _gate(build(config, 0.9), LATENCY, REFERENCE, SPEC, 0.02)
    assert manifest.parent == "fp32"
    assert manifest.variant == config.name
    assert manifest.technique == technique


def test_manifest_describes_the_artifact_and_build():
    artifact = b"\x08\x07 some onnx bytes"
    variant = build(PrunedConfig(), 0.88, artifact=artifact, param_count=42)
    manifest = _gate(variant, LATENCY, REFERENCE, SPEC, 0.05)
    assert manifest.model == SPEC.name
    assert manifest.sha256 == sha256_hex(artifact)
    assert manifest.size_bytes == len(artifact)
    assert manifest.param_count == 42
    assert manifest.details == {"technique_param": 1}
    assert config_from_params(manifest.params) == PrunedConfig()
    assert manifest.latency_ms == LATENCY
    assert manifest.build == {"node": "host-a/0123456789ab", "seconds": 12.35}


def test_gated_manifests_can_be_published(tmp_path):
    repository = ModelRepository(tmp_path)
    repository.register_model(ModelRecord.for_spec(SPEC, reference_variant="fp32"))
    for variant in (REFERENCE, build(Int8Config(), 0.5)):
        manifest = _gate(variant, LATENCY, REFERENCE, SPEC, 0.02)
        repository.publish_variant(manifest, variant.compressed.onnx)
    statuses = {m.variant: m.status for m in repository.variants(SPEC.name)}
    assert statuses == {"fp32": "ready", "int8": "rejected"}
