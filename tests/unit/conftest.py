"""Unit tests must never start Ray: any ``ray.init`` call fails the test that makes it."""

from __future__ import annotations

import pytest
import ray

# The serving tests' tiny repository and data plane (see serving_fixtures.py).
from tests.unit.serving_fixtures import served, serving, tiny_repository  # noqa: F401


def _refuse_ray(*args, **kwargs):
    raise AssertionError("unit tests must not start Ray")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(ray, "init", _refuse_ray)
