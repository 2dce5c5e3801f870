"""Unit tests must never start Ray: any ``ray.init`` call fails the test that makes it."""

from __future__ import annotations

import pytest
import ray

# The serving tests' tiny repository and data plane (see serving_fixtures.py).
from tests.unit.serving_fixtures import served, serving, tiny_repository  # noqa: F401
from tests.unit.tiny_model import conv_spec, mlp_spec
from tests.unit.trained_case import TrainedCase


def _refuse_ray(*args, **kwargs):
    raise AssertionError("unit tests must not start Ray")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(ray, "init", _refuse_ray)


@pytest.fixture(scope="session")
def conv_case() -> TrainedCase:
    """TinyConvNet trained on 8x8 digits, for every technique's tests."""
    return TrainedCase(conv_spec())


@pytest.fixture(scope="session")
def mlp_case() -> TrainedCase:
    """TinyMlp trained on flattened 8x8 digits, for every technique's tests."""
    return TrainedCase(mlp_spec())
