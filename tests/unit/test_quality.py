import numpy as np
import pytest

from gearbox.compression import InvalidArgumentError
from gearbox.compression.quality import (
    QualityMetric,
    get_metric,
    neighbour_agreement,
    row_cosines,
)

OUTPUTS = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])


def test_accuracy_is_the_fraction_of_correct_top1():
    accuracy = get_metric("accuracy")
    assert accuracy.score(OUTPUTS, np.array([1, 0, 2, 2])) == 1.0
    assert accuracy.score(OUTPUTS, np.array([1, 0, 0, 0])) == 0.5
    assert accuracy.score(OUTPUTS, np.array([0, 1, 0, 0])) == 0.0


def test_accuracy_needs_labels():
    with pytest.raises(InvalidArgumentError, match="needs labels"):
        get_metric("accuracy").score(OUTPUTS, None)


def test_agreement_compares_top1_with_the_reference():
    reference = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    metric = get_metric("accuracy")
    assert metric.agreement(OUTPUTS, reference) == 0.75
    assert metric.agreement(OUTPUTS, OUTPUTS) == 1.0
    assert metric.agreement(OUTPUTS * 10 - 3, OUTPUTS) == 1.0  # only the ranking matters


def test_agreement_refuses_outputs_of_another_shape():
    with pytest.raises(InvalidArgumentError, match="cannot compare outputs of shape"):
        get_metric("accuracy").agreement(OUTPUTS, OUTPUTS[:2])


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(InvalidArgumentError) as caught:
        get_metric("f1")
    assert caught.value.message == "unknown quality metric 'f1' (known: accuracy, cosine)"


def test_a_metric_scores_only_the_way_it_is_defined():
    with pytest.raises(InvalidArgumentError, match="'bleu' is scored against the reference"):
        QualityMetric("bleu", relative=True, default_max_drop=0.1).score(OUTPUTS, np.zeros(4))
    with pytest.raises(InvalidArgumentError, match="'accuracy' is scored against the labels"):
        get_metric("accuracy").score_against(OUTPUTS, OUTPUTS)


# --- embeddings ---------------------------------------------------------------------------


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_cosine_is_scored_against_the_reference_outputs():
    cosine = get_metric("cosine")
    assert cosine.relative and not get_metric("accuracy").relative
    reference = _unit_rows(np.random.default_rng(0).normal(size=(6, 8)))
    assert cosine.score_against(reference, reference) == pytest.approx(1.0)
    assert cosine.score_against(reference * 3.0, reference) == pytest.approx(1.0)  # scale-free
    assert cosine.score_against(-reference, reference) == pytest.approx(-1.0)
    rotated = reference.copy()
    rotated[0] = _unit_rows(reference[:1] + reference[1:2])[0]
    expected = (5 + float(rotated[0] @ reference[0])) / 6
    assert cosine.score_against(rotated, reference) == pytest.approx(expected)
    assert cosine.agreement(rotated, reference) == pytest.approx(expected)


def test_row_cosines_and_the_minimum_in_the_details():
    reference = np.eye(3)
    outputs = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert row_cosines(outputs, reference) == pytest.approx([1.0, 2**-0.5, 1.0])
    details = get_metric("cosine").details(outputs, reference)
    assert details["min_cosine"] == pytest.approx(2**-0.5)
    assert set(details) == {"min_cosine", "neighbour_agreement"}
    assert get_metric("accuracy").details(OUTPUTS, OUTPUTS) == {}


def test_neighbour_agreement_counts_rows_whose_nearest_other_row_is_unchanged():
    # Two tight pairs: each row's neighbour is its partner.
    reference = _unit_rows(np.array([[1.0, 0.1, 0], [1.0, 0.0, 0], [0, 1.0, 0.1], [0, 1.0, 0.0]]))
    assert neighbour_agreement(reference, reference) == 1.0
    # Row 0 moves next to rows 2 and 3; the others' neighbours stay.
    moved = reference.copy()
    moved[0] = _unit_rows(np.array([[0.0, 1.0, 0.05]]))[0]
    agreement = neighbour_agreement(moved, reference)
    assert agreement == pytest.approx(
        np.mean([_nearest(moved, i) == _nearest(reference, i) for i in range(4)])
    )
    assert agreement < 1.0
    with pytest.raises(InvalidArgumentError, match="at least two rows"):
        neighbour_agreement(reference[:1], reference[:1])


def _nearest(rows: np.ndarray, index: int) -> int:
    similarity = rows @ rows[index]
    similarity[index] = -np.inf
    return int(np.argmax(similarity))


def test_each_metric_has_its_own_gate():
    assert get_metric("accuracy").default_max_drop == 0.02
    assert get_metric("cosine").default_max_drop == 0.05
