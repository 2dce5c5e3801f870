"""A Gearbox error raised in another replica comes back as itself, message and all."""

from __future__ import annotations

import pickle

import pytest
from ray.exceptions import RayTaskError

from gearbox.compression.errors import (
    GearboxError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from gearbox.serving.hosting import unwrap_remote_error


def _as_ray_raises_it(error: Exception) -> Exception:
    """What awaiting a handle call raises when the replica raised ``error``."""
    wrapped = RayTaskError("call", "Traceback ...", error, proctitle="t", pid=1, ip="127.0.0.1")
    # Ray ships the RayTaskError and builds the dual class where the caller awaits it.
    return pickle.loads(pickle.dumps(wrapped)).as_instanceof_cause()


@pytest.mark.parametrize(
    "raised", [NotFoundError("no request 'x'"), ResourceExhaustedError("queue full")]
)
def test_the_original_class_and_message_come_back(raised):
    error = _as_ray_raises_it(raised)
    assert isinstance(error, RayTaskError) and isinstance(error, type(raised))
    unwrapped = unwrap_remote_error(error, "the call")
    assert type(unwrapped) is type(raised)
    assert unwrapped.message == raised.message


def test_a_dual_error_whose_cause_is_lost_keeps_its_class():
    error = _as_ray_raises_it(NotFoundError("gone"))
    error.cause = "gone"  # what Ray Serve hands back for some replica errors
    unwrapped = unwrap_remote_error(error, "the call")
    assert type(unwrapped) is NotFoundError and unwrapped.message == "gone"


def test_anything_else_is_unavailable():
    unwrapped = unwrap_remote_error(_as_ray_raises_it(ValueError("boom")), "the ledger's report")
    assert isinstance(unwrapped, UnavailableError)
    assert "the ledger's report" in unwrapped.message and "ValueError" in unwrapped.message
    assert isinstance(unwrapped, GearboxError)
