"""The gateway's own endpoints beyond OIP inference: A/B experiments, feedback, and loading
and unloading models (Triton's model-repository extension).

Protocol-neutral like the data plane; the HTTP adapter maps them to ``/v2/experiments``,
``/v2/feedback`` and ``/v2/repository/models/{m}/load|unload``, the gRPC adapter the last two
to ``RepositoryModelLoad`` / ``RepositoryModelUnload``. Calls that change what the gateway does
(creating or ending an experiment, loading or unloading a model) need the admin token as a
bearer token; reading reports and sending feedback do not, as the callers of the gateway send
feedback for their own requests.
"""

from __future__ import annotations

import hmac
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from gearbox.compression.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from gearbox.serving.config import ADMIN_TOKEN_VARIABLE
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.experiment_store import ReplicaExperiments
from gearbox.serving.experiments import DEFAULT_CONFIDENCE, Experiment
from gearbox.serving.repository_control import ReplicaRepository

UNLOAD_PARAMETERS = frozenset({"unload_dependents"})
"""What Triton's unload takes; Gearbox models have no dependents, so it changes nothing."""


class _Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    label: int | None = None
    score: float | int | None = None


class Administration:
    def __init__(
        self,
        plane: DataPlane,
        experiments: ReplicaExperiments | None,
        token: str | None,
        repository: ReplicaRepository | None = None,
    ) -> None:
        self._plane = plane
        self._experiments = experiments
        self._token = token
        self._repository = repository

    def authorize(self, authorization: str | None) -> None:
        """Passes only an ``Authorization: Bearer <token>`` naming this gateway's token."""
        if self._token is None:
            raise PermissionDeniedError(
                "admin calls are turned off on this gateway: start it with an admin token "
                f"(environment variable {ADMIN_TOKEN_VARIABLE})"
            )
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise UnauthenticatedError("admin calls need the header 'Authorization: Bearer TOKEN'")
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise UnauthenticatedError("the admin token is wrong")

    def _updates(self) -> ReplicaRepository:
        if self._repository is None:
            raise UnavailableError("this gateway does not follow repository updates")
        return self._repository

    async def load_model(
        self, model: str, parameters: dict[str, Any], authorization: str | None
    ) -> dict[str, Any]:
        """Serves ``model`` as the repository holds it now (variants published, re-published
        or removed since are picked up), on every replica, before answering."""
        self.authorize(authorization)
        if parameters:
            raise InvalidArgumentError(
                f"load takes no parameters (given: {', '.join(sorted(parameters))}): Gearbox "
                "serves what its repository holds; publish variants with `gearbox compress`"
            )
        return {"name": model, "generation": await self._updates().load(model)}

    async def unload_model(
        self, model: str, parameters: dict[str, Any], authorization: str | None
    ) -> dict[str, Any]:
        """Stops serving ``model`` on every replica until it is loaded again."""
        self.authorize(authorization)
        unknown = sorted(set(parameters) - UNLOAD_PARAMETERS)
        if unknown:
            raise InvalidArgumentError(
                f"unload takes only {', '.join(sorted(UNLOAD_PARAMETERS))} "
                f"(given: {', '.join(unknown)})"
            )
        return {"name": model, "generation": await self._updates().unload(model)}

    def _ledger(self) -> ReplicaExperiments:
        if self._experiments is None:
            raise UnavailableError("this gateway runs no experiment ledger")
        return self._experiments

    async def create_experiment(self, body: object, authorization: str | None) -> dict[str, Any]:
        self.authorize(authorization)
        experiment = Experiment.from_dict(body)
        self._plane.check_experiment(experiment)
        await self._ledger().create(experiment)
        return experiment.to_dict()

    async def end_experiment(self, name: str, authorization: str | None) -> dict[str, Any]:
        self.authorize(authorization)
        await self._ledger().end(name)
        return {"name": name, "active": False}

    async def experiments(self) -> list[dict[str, Any]]:
        return await self._ledger().listing()

    async def report(self, name: str, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
        if not (math.isfinite(confidence) and 0.0 < confidence < 1.0):
            raise InvalidArgumentError(f"confidence must lie in (0, 1), got {confidence:g}")
        return await self._ledger().report(name, confidence)

    async def feedback(self, body: object) -> dict[str, Any]:
        """Takes ``{"id": REQUEST_ID, "label": CLASS}`` or ``{"id": ..., "score": NUMBER}``."""
        try:
            feedback = _Feedback.model_validate(body)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "the body"
            raise InvalidArgumentError(
                f'feedback {where}: {first["msg"]} (send {{"id": REQUEST_ID, "label": CLASS}}'
                ' or {"id": REQUEST_ID, "score": NUMBER})'
            ) from None
        score = None if feedback.score is None else float(feedback.score)
        await self._ledger().feedback(feedback.id, feedback.label, score)
        return {"id": feedback.id, "recorded": True}
