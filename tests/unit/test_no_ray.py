"""The unit suite's guard: nothing here may start Ray."""

import pytest
import ray

from gearbox.compression import ray_session


def test_ray_init_is_refused():
    with pytest.raises(AssertionError, match="unit tests must not start Ray"):
        ray.init()


def test_ray_session_would_fail_loudly_instead_of_starting_ray():
    assert not ray.is_initialized()
    with pytest.raises(AssertionError, match="unit tests must not start Ray"), ray_session(None):
        pass
