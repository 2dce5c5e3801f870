"""Connecting to Ray: the one place a Gearbox command starts or joins a cluster.

Kept free of torch and the training stack, so that serving commands start quickly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import ray

from gearbox.compression.errors import UnavailableError


@contextmanager
def ray_session(
    address: str | None,
    env: Mapping[str, str] | None = None,
) -> Iterator[None]:
    """Use the Ray already initialised in this process, or connect/start one for the block.

    ``address=None`` starts a local Ray; ``"auto"`` joins the cluster on this machine;
    anything else is a Ray address. Modules in the current directory stay importable on workers.
    ``env`` is set for every Ray process a local start creates; on a joined cluster it reaches
    this job's own workers.
    """
    if ray.is_initialized():
        yield
        return
    if not address:
        os.environ.update(env or {})
    python_path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    job_env = {
        **{k: os.environ.get(k, v) for k, v in (env or {}).items()},
        "PYTHONPATH": python_path,
    }
    try:
        ray.init(
            # "local" always starts a new local Ray; None would join whatever cluster
            # /tmp/ray last recorded, even one that has since stopped.
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            runtime_env={"env_vars": job_env},
        )
    except Exception as exc:
        # Ray's own failures to start or join; a plain Exception when its node times out
        # starting. Anything else is not Ray's answer and goes on as it is.
        ray_failure = type(exc) is Exception or isinstance(
            exc, (ConnectionError, RuntimeError, ValueError)
        )
        if not ray_failure:
            raise
        where = f"at {address}" if address else "locally"
        hint = ""
        if address and not os.environ.get("RAY_AUTH_MODE"):
            hint = (
                " (a cluster started with `ray start` uses token auth: export RAY_AUTH_MODE=token)"
            )
        raise UnavailableError(f"cannot start or reach Ray {where}: {exc}{hint}") from exc
    try:
        yield
    finally:
        ray.shutdown()
