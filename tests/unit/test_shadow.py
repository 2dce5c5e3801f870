"""Live agreement with the reference: the running share, the comparison, the sampling."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gearbox.compression.errors import ResourceExhaustedError, UnavailableError
from gearbox.serving.shadow import Agreement, Shadow, agreement
from tests.unit.serving_fixtures import OUTPUT, RecordingMetrics
from tests.unit.tiny_model import make_record

RECORD = make_record("tiny")  # classification, reference "fp32", output "logits"


def test_agreement_is_the_offline_figure_until_rows_are_compared():
    tracker = Agreement(offline=0.97)
    assert tracker.value == 0.97
    tracker.add(3.0, 4)
    assert tracker.value == 0.75
    tracker.add(4.0, 4)
    assert tracker.value == 7 / 8


def test_classification_agreement_counts_equal_top_1():
    answer = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]], np.float32)
    reference = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    assert agreement("classification", answer, reference) == (2.0, 3)


def test_other_tasks_agree_by_cosine_similarity_per_row():
    reference = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])
    answer = np.array([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0], [0.0, 0.0]])
    matched, rows = agreement("regression", answer, reference)
    assert rows == 4
    assert matched == pytest.approx(1.0 + 0.0 - 1.0 + 0.0)  # a zero row matches nothing
    # Rows of any shape are flattened first.
    cube = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1
    assert agreement("embedding", cube, cube) == (pytest.approx(2.0), 2)


def reference_answer(value: float = 1.0):
    calls = []

    async def run_reference(model, variant, inputs):
        calls.append((model, variant))
        rows = len(next(iter(inputs.values())))
        logits = np.zeros((rows, 10), np.float32)
        logits[:, 0] = value
        return {OUTPUT: logits}

    return run_reference, calls


def logits(top: list[int]) -> dict[str, np.ndarray]:
    out = np.zeros((len(top), 10), np.float32)
    out[np.arange(len(top)), top] = 1.0
    return {OUTPUT: out}


INPUTS = {"images": np.zeros((2, 1, 8, 8), np.float32)}


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_share_of_the_non_reference_answers_is_compared():
    run_reference, calls = reference_answer()
    metrics = RecordingMetrics()
    shadow = Shadow(0.5, run_reference, metrics)
    tracker = Agreement(0.9)

    async def main():
        for _ in range(4):
            shadow.maybe_compare(RECORD, "int8", tracker, INPUTS, logits([0, 3]))
            await settle()
        # The reference answering itself is never compared (and earns no credit).
        for _ in range(4):
            shadow.maybe_compare(RECORD, "fp32", tracker, INPUTS, logits([0, 0]))
            await settle()

    asyncio.run(main())
    assert calls == [("tiny", "fp32")] * 2  # every second one
    assert (tracker.matched, tracker.rows) == (2.0, 4)  # one of two rows agreed, twice
    assert metrics.agreements == [("tiny", "int8", 0.5)] * 2


def test_no_comparison_at_fraction_zero_and_every_one_at_fraction_one():
    for fraction, expected in ((0.0, 0), (1.0, 3)):
        run_reference, calls = reference_answer()
        shadow = Shadow(fraction, run_reference, RecordingMetrics())

        async def main(shadow=shadow):
            for _ in range(3):
                shadow.maybe_compare(RECORD, "small", Agreement(0.9), INPUTS, logits([0, 0]))
                await settle()

        asyncio.run(main())
        assert len(calls) == expected


@pytest.mark.parametrize(
    "error", [ResourceExhaustedError("queue full"), UnavailableError("shutting down")]
)
def test_a_busy_or_closing_reference_skips_the_comparison(error):
    async def run_reference(model, variant, inputs):
        raise error

    metrics = RecordingMetrics()
    tracker = Agreement(0.9)
    shadow = Shadow(1.0, run_reference, metrics)

    async def main():
        shadow.maybe_compare(RECORD, "int8", tracker, INPUTS, logits([0, 0]))
        await settle()

    asyncio.run(main())
    assert (tracker.rows, tracker.value) == (0, 0.9)
    assert metrics.agreements == []


def test_comparisons_wait_for_idle_and_a_busy_spell_banks_no_burst():
    run_reference, calls = reference_answer()
    idle = {"now": False}
    shadow = Shadow(0.5, run_reference, RecordingMetrics(), idle=lambda: idle["now"])
    tracker = Agreement(0.9)

    async def answer():
        shadow.maybe_compare(RECORD, "int8", tracker, INPUTS, logits([0, 0]))
        await settle()

    async def main():
        for _ in range(6):  # busy: nothing compared, however many answers go by
            await answer()
        busy = len(calls)
        idle["now"] = True
        counts = []
        for _ in range(4):
            await answer()
            counts.append(len(calls))
        return busy, counts

    busy, counts = asyncio.run(main())
    assert busy == 0
    # The credit saved while busy is worth one comparison, not three; then every second one.
    assert counts == [1, 1, 2, 2]
