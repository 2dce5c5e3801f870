"""The unit suite's guard: nothing here may start Ray."""

import pytest
import ray

from gearbox.compression import ray_session


def test_ray_init_is_refused():
    with pytest.raises(AssertionError, match="unit tests must not start Ray"):
        ray.init()


def test_ray_session_would_fail_loudly_instead_of_starting_ray():
    if ray.is_initialized():
        # ray_session reuses a connected Ray, so the guard cannot be observed here.
        pytest.skip("an integration session already joined Ray in this process")
    with pytest.raises(AssertionError, match="unit tests must not start Ray"), ray_session(None):
        pass
