import numpy as np
import pytest

from gearbox.compression import InvalidArgumentError
from gearbox.compression.quality import QualityMetric, get_metric

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
    assert caught.value.message == "unknown quality metric 'f1' (known: accuracy)"


def test_unknown_metric_object_cannot_score():
    with pytest.raises(InvalidArgumentError, match="unknown quality metric 'bleu'"):
        QualityMetric("bleu").score(OUTPUTS, np.zeros(4))
