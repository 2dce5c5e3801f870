from dataclasses import dataclass, field

import numpy as np
import pytest

from gearbox.compression import CPU, DeviceClass, Fp32Config, InvalidArgumentError, apply_technique
from gearbox.compression.evaluation import (
    DEFAULT_TOKEN_LENGTH,
    PROFILE_TOKEN_LENGTHS,
    LatencyBudget,
    evaluate_quality,
    measure_latency,
    profile_latency,
    sequence_axes,
)
from gearbox.compression.onnx_export import run_onnx
from gearbox.compression.quality import get_metric
from gearbox.compression.techniques import TechniqueInput
from tests.unit.tiny_encoder import encoder_spec, tiny_encoder
from tests.unit.tiny_model import CONV_SIGNATURE, conv_spec, linear_onnx, tiny_splits

QUICK = LatencyBudget(warmup=1, min_iterations=5, max_iterations=20, min_seconds=0.0)


def test_measure_latency_reports_p50_and_p95_per_batch_size():
    profile = measure_latency(linear_onnx(), CPU, tiny_splits().heldout, budget=QUICK)
    assert set(profile) == {"1", "8"}
    for figures in profile.values():
        assert set(figures) == {"p50", "p95"}
        assert figures["p95"] >= figures["p50"] > 0


def test_measure_latency_honours_batch_sizes():
    profile = measure_latency(
        linear_onnx(), CPU, tiny_splits().heldout, batch_sizes=(3,), budget=QUICK
    )
    assert list(profile) == ["3"]


def test_evaluate_quality_scores_the_held_out_split():
    spec = conv_spec()
    data = tiny_splits()
    artifact = linear_onnx()
    evaluation = evaluate_quality(artifact, spec, data)

    expected = run_onnx(artifact, spec, data.heldout)
    np.testing.assert_array_equal(evaluation.outputs, expected)
    assert evaluation.outputs.shape == (len(data.heldout), 10)
    assert evaluation.quality == get_metric("accuracy").score(expected, data.heldout.labels)


def test_profile_latency_skips_unavailable_device_classes():
    missing = DeviceClass("imaginary", execution_provider="NoSuchExecutionProvider")
    profile = profile_latency(linear_onnx(), tiny_splits().heldout, [CPU, missing], budget=QUICK)
    assert list(profile) == ["cpu"]
    assert set(profile["cpu"]) == {"1", "8"}


# --- models whose inputs have a length: token sequences -------------------------------------

ENCODER_SPEC = encoder_spec()
ENCODER_DATA = ENCODER_SPEC.load_data()
# The tiny BERT has 64 positions; the split's sentences are 12 tokens wide.
LENGTHS = (8, 16, DEFAULT_TOKEN_LENGTH)


@pytest.fixture(scope="module")
def encoder_onnx() -> bytes:
    inputs = TechniqueInput(
        spec=ENCODER_SPEC,
        data=ENCODER_DATA,
        reference_model=tiny_encoder(),
        parent_artifact=None,
        parent_param_count=None,
    )
    return apply_technique(Fp32Config(), inputs).onnx


@dataclass(frozen=True)
class RecordingDevice(DeviceClass):
    """The cpu device class, keeping every feed its sessions are given."""

    feeds: list = field(default_factory=list)

    def create_session(self, model):
        session = super().create_session(model)
        feeds = self.feeds

        class Recording:
            def run(self, outputs, feed):
                feeds.append({name: array.copy() for name, array in feed.items()})
                return session.run(outputs, feed)

        return Recording()


def test_sequence_axes_are_the_dynamic_axes_beyond_the_batch():
    assert sequence_axes(ENCODER_SPEC.signature) == {"input_ids": (1,), "attention_mask": (1,)}
    assert sequence_axes(conv_spec().signature) == {}


def test_an_encoder_is_timed_at_every_token_length_and_batch_size(encoder_onnx):
    profile = measure_latency(
        encoder_onnx,
        CPU,
        ENCODER_DATA.heldout,
        budget=QUICK,
        signature=ENCODER_SPEC.signature,
        token_lengths=LENGTHS,
    )
    assert set(profile) == {"1", "8"}
    for figures in profile.values():
        assert set(figures) == {"p50", "p95", "tokens"}
        assert set(figures["tokens"]) == {str(length) for length in LENGTHS}
        for at_length in figures["tokens"].values():
            assert set(at_length) == {"p50", "p95"}
            assert at_length["p95"] >= at_length["p50"] > 0
        # Readers that know nothing of lengths see the default length's figures.
        assert {k: figures[k] for k in ("p50", "p95")} == figures["tokens"]["64"]


def test_each_length_is_fed_rows_of_that_many_real_columns(encoder_onnx):
    device = RecordingDevice("cpu")
    measure_latency(
        encoder_onnx,
        device,
        ENCODER_DATA.heldout,
        budget=QUICK,
        signature=ENCODER_SPEC.signature,
        token_lengths=LENGTHS,
    )
    shapes = {feed["input_ids"].shape for feed in device.feeds}
    assert shapes == {(rows, length) for rows in (1, 8) for length in LENGTHS}
    heldout = ENCODER_DATA.heldout.inputs
    width = heldout["input_ids"].shape[1]
    longest = next(feed for feed in device.feeds if feed["input_ids"].shape == (8, 64))
    for name in ("input_ids", "attention_mask"):
        assert longest[name].shape == (8, 64)
        # Past the split's width its own columns come round again, ids and mask together.
        np.testing.assert_array_equal(longest[name][:, :width], heldout[name][:8])
        np.testing.assert_array_equal(longest[name][:, width : 2 * width], heldout[name][:8])
    shortest = next(feed for feed in device.feeds if feed["input_ids"].shape == (1, 8))
    np.testing.assert_array_equal(shortest["attention_mask"], heldout["attention_mask"][:1, :8])


def test_a_model_of_fixed_shapes_is_timed_as_it_comes():
    device = RecordingDevice("cpu")
    profile = measure_latency(
        linear_onnx(), device, tiny_splits().heldout, budget=QUICK, signature=CONV_SIGNATURE
    )
    assert {key: set(figures) for key, figures in profile.items()} == {
        "1": {"p50", "p95"},
        "8": {"p50", "p95"},
    }
    assert {feed["images"].shape for feed in device.feeds} == {(1, 1, 8, 8), (8, 1, 8, 8)}


def test_the_profiled_lengths_must_include_the_default_one(encoder_onnx):
    with pytest.raises(InvalidArgumentError, match="must include the default length 64"):
        measure_latency(
            encoder_onnx,
            CPU,
            ENCODER_DATA.heldout,
            budget=QUICK,
            signature=ENCODER_SPEC.signature,
            token_lengths=(8, 16),
        )


def test_profile_latency_times_an_encoder_per_length_on_each_device_class(encoder_onnx):
    profile = profile_latency(
        encoder_onnx,
        ENCODER_DATA.heldout,
        [CPU],
        budget=QUICK,
        signature=ENCODER_SPEC.signature,
        token_lengths=LENGTHS,
    )
    assert list(profile) == ["cpu"]
    assert set(profile["cpu"]["8"]["tokens"]) == {"8", "16", "64"}


def test_the_default_profile_lengths_hold_the_default_length():
    assert DEFAULT_TOKEN_LENGTH in PROFILE_TOKEN_LENGTHS
    assert list(PROFILE_TOKEN_LENGTHS) == sorted(PROFILE_TOKEN_LENGTHS)
