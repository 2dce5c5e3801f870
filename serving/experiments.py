"""A/B experiments: their definition, sticky assignment of requests to arms, and the ledger
of outcomes and feedback that their reports are computed from.

An experiment splits one model's traffic between arms, each arm a variant with a weight. A
request carrying a ``routing_key`` always lands on the same arm (in every process, on every
replica); a request without one is assigned at random by the weights. The gateway records an
:class:`Outcome` per assigned request; callers later send feedback (the true label, or a
score) for a request id, and :meth:`ExperimentLedger.report` compares the arms.

This module holds only the pure logic: no Ray, no HTTP. The statistics live in
:mod:`gearbox.serving.experiment_report`, imported only when a report is asked for, so that a
gateway replica that merely assigns arms does not load scipy.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gearbox.compression.errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from gearbox.serving.experiment_report import ExperimentReport

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
DEFAULT_MAX_OUTCOMES = 200_000
DEFAULT_CONFIDENCE = 0.95
_NAME = re.compile(NAME_PATTERN)
# Normalised weights are kept as given when they already sum to 1 this closely, so that
# from_dict(to_dict(e)) == e exactly instead of drifting by a rounding error each trip.
_WEIGHT_SUM_TOLERANCE = 1e-9
_HASH_SPAN = float(2**64)


@dataclass(frozen=True)
class Arm:
    """One side of an experiment: the variant it serves and its share of the traffic."""

    name: str
    variant: str
    weight: float
    """Share of the experiment's requests; the arms' weights sum to 1."""


@dataclass(frozen=True)
class Experiment:
    """A split of one model's traffic between arms. The first arm is the control."""

    name: str
    model: str
    arms: tuple[Arm, ...]

    @classmethod
    def from_dict(cls, data: object) -> Experiment:
        """Parse a Serve config entry or an admin call's JSON body; weights are normalised.

        Raises :class:`InvalidArgumentError` with one line naming the first problem.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgumentError(
                f"invalid experiment: expected a JSON object, got {_json_type(data)}"
            )
        try:
            body = _ExperimentBody.model_validate(dict(data))
        except ValidationError as error:
            raise InvalidArgumentError(_one_line(error, data)) from None
        weights = _normalised([arm.weight for arm in body.arms])
        arms = tuple(
            Arm(name=arm.name or arm.variant, variant=arm.variant, weight=weight)
            for arm, weight in zip(body.arms, weights, strict=True)
        )
        return cls(name=body.name, model=body.model, arms=arms)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form :meth:`from_dict` reads back to an equal experiment."""
        return {
            "name": self.name,
            "model": self.model,
            "arms": [
                {"name": arm.name, "variant": arm.variant, "weight": arm.weight}
                for arm in self.arms
            ],
        }

    @property
    def control(self) -> Arm:
        return self.arms[0]

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise NotFoundError(f"experiment '{self.name}' has no arm '{name}'")


class _ArmBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: str = Field(min_length=1)
    weight: float = Field(gt=0, allow_inf_nan=False)
    name: str | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _not_bool(cls, value: object) -> object:
        # pydantic reads true as 1.0; a boolean weight is a mistake in the body, not a number.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("name")
    @classmethod
    def _arm_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(f"'{value}' must match {NAME_PATTERN}")
        return value


class _ExperimentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    model: str = Field(min_length=1)
    arms: list[_ArmBody] = Field(min_length=2)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"'{value}' must be 1-64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _unique_arm_names(self) -> _ExperimentBody:
        seen: set[str] = set()
        for arm in self.arms:
            name = arm.name or arm.variant
            if name in seen:
                raise ValueError(
                    f"arm name '{name}' is used twice (an arm is named after its variant "
                    "unless it has a 'name'; name arms that share a variant)"
                )
            seen.add(name)
        return self


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _where(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _one_line(error: ValidationError, data: Mapping[str, Any]) -> str:
    """The first problem pydantic found, said in one line for a person; pydantic's own text
    spans several lines and names its internal models."""
    problems = error.errors(include_url=False)
    # A misspelt field also shows as a missing one; naming the misspelling explains both.
    first = min(problems, key=lambda problem: problem["type"] != "extra_forbidden")
    location = tuple(first["loc"])
    where = _where(location)
    kind = first["type"]
    if kind == "missing":
        what = f"'{location[-1]}' is required" if location else "a field is missing"
        where = _where(location[:-1])
    elif kind == "extra_forbidden":
        what = f"unknown field '{location[-1]}'"
        where = _where(location[:-1])
    elif kind == "too_short" and location == ("arms",):
        arms = data.get("arms")
        count = len(arms) if isinstance(arms, list) else 0
        what = f"needs at least 2 arms, got {count}"
    elif kind == "greater_than":
        what = f"must be positive, got {first['input']!r}"
    elif kind == "string_too_short":
        what = "must not be empty"
    elif kind == "value_error":
        what = str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
    else:
        what = f"{first['msg'][0].lower()}{first['msg'][1:]}, got {first['input']!r}"
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"invalid experiment: {where + ': ' if where else ''}{what}{more}"


def _normalised(weights: list[float]) -> list[float]:
    total = math.fsum(weights)
    if abs(total - 1.0) <= _WEIGHT_SUM_TOLERANCE:
        return weights
    return [weight / total for weight in weights]


def key_point(experiment: str, routing_key: str) -> float:
    """Where ``routing_key`` falls in [0, 1) for ``experiment``: the same in every process.

    Python's ``hash`` of a str is salted per process, so it cannot make assignment sticky
    across replicas; blake2b is. The experiment's name is mixed in so that one key is not
    always on the first arm of every experiment.
    """
    digest = hashlib.blake2b(f"{experiment}\0{routing_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN


def assign(experiment: Experiment, routing_key: str | None, rng: random.Random) -> Arm:
    """The arm a request goes to: sticky for a routing key, random by the weights without."""
    point = rng.random() if routing_key is None else key_point(experiment.name, routing_key)
    cumulative = 0.0
    for arm in experiment.arms:
        cumulative += arm.weight
        if point < cumulative:
            return arm
    # The weights may sum to a hair under 1; a point in that sliver belongs to the last arm.
    return experiment.arms[-1]


@dataclass(frozen=True)
class Outcome:
    """What the gateway saw of one request an experiment assigned."""

    request_id: str
    experiment: str
    arm: str
    variant: str
    latency_ms: float
    budget_met: bool | None
    """None when the request had no latency budget."""
    prediction: int | None
    """Top-1 class for a classification model; None for embeddings."""
    recorded_at: float = field(default_factory=time.time)


def check_feedback(outcome: Outcome | None, label: int | None, score: float | None) -> None:
    """Refuses feedback that is not exactly one integer ``label`` or one finite ``score``, or
    a label for ``outcome`` (when known) that has no predicted class to check it against."""
    if (label is None) == (score is None):
        raise InvalidArgumentError("feedback needs exactly one of 'label' and 'score'")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise InvalidArgumentError(f"feedback label must be an integer class, got {label!r}")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score)
    ):
        raise InvalidArgumentError(f"feedback score must be a finite number, got {score!r}")
    if outcome is not None and label is not None and outcome.prediction is None:
        raise InvalidArgumentError(
            f"request '{outcome.request_id}' has no predicted class to check a label against "
            "(an embedding model, or several rows); send a score instead"
        )


@dataclass
class _Entry:
    outcome: Outcome
    label: int | None = None
    score: float | None = None

    @property
    def has_feedback(self) -> bool:
        return self.label is not None or self.score is not None


@dataclass
class _State:
    experiment: Experiment
    created_at: float
    ended_at: float | None = None
    entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    """Outcomes by request id, oldest first."""
    dropped: int = 0
    """Outcomes evicted to bound memory."""

    @property
    def active(self) -> bool:
        return self.ended_at is None


class ExperimentLedger:
    """Every experiment one process knows of, with their recent outcomes and feedback.

    Memory is bounded: each experiment keeps its ``max_outcomes`` most recent outcomes, and
    feedback can only be given for those. Not thread-safe: meant for one event loop.
    """

    def __init__(self, max_outcomes: int = DEFAULT_MAX_OUTCOMES) -> None:
        if max_outcomes < 1:
            raise InvalidArgumentError(f"max_outcomes must be positive, got {max_outcomes}")
        self.max_outcomes = max_outcomes
        self._states: dict[str, _State] = {}
        self._requests: dict[str, _State] = {}
        """Which experiment holds each request id, for feedback that names only the id."""
        self._agreement: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
        """(model, variant) -> source -> the source's latest (matched, rows) totals."""
        self.discarded = 0
        """Outcomes received for an experiment that is unknown or has ended."""

    def create(self, experiment: Experiment) -> None:
        """Start ``experiment``. An ended one of the same name is replaced, outcomes and all."""
        current = self._states.get(experiment.name)
        if current is not None and current.active:
            raise InvalidArgumentError(f"experiment '{experiment.name}' already exists")
        for state in self._states.values():
            if state.active and state.experiment.model == experiment.model:
                # A request to a model must belong to one experiment, or its arm is ambiguous.
                raise InvalidArgumentError(
                    f"model '{experiment.model}' already has an active experiment "
                    f"'{state.experiment.name}'; end it first"
                )
        if current is not None:
            self._forget(current)
        self._states[experiment.name] = _State(experiment, created_at=time.time())

    def end(self, name: str) -> Experiment:
        """Stop assigning requests to ``name``; its outcomes stay, and it can still be
        reported (flagged ended) and receive feedback. Ending it again changes nothing."""
        state = self._state(name)
        if state.active:
            state.ended_at = time.time()
        return state.experiment

    def active(self) -> tuple[Experiment, ...]:
        return tuple(s.experiment for s in self._states.values() if s.active)

    def get(self, name: str) -> Experiment:
        """The experiment called ``name``, active or ended."""
        return self._state(name).experiment

    def is_active(self, name: str) -> bool:
        return self._state(name).active

    def for_model(self, model: str) -> Experiment | None:
        """The active experiment on ``model``, if any: the one a request to it joins."""
        for state in self._states.values():
            if state.active and state.experiment.model == model:
                return state.experiment
        return None

    def listing(self) -> list[dict[str, Any]]:
        """Every experiment as JSON: its definition, whether active, and its counts."""
        return [
            {
                **state.experiment.to_dict(),
                "active": state.active,
                "created_at": state.created_at,
                "ended_at": state.ended_at,
                "requests": len(state.entries),
                "feedback": sum(entry.has_feedback for entry in state.entries.values()),
            }
            for state in self._states.values()
        ]

    def record(self, outcomes: Iterable[Outcome]) -> int:
        """Keep ``outcomes``; returns how many were kept. Outcomes of an unknown or ended
        experiment, or naming an arm it does not have, are dropped and counted in
        :attr:`discarded`."""
        kept = 0
        for outcome in outcomes:
            state = self._states.get(outcome.experiment)
            if (
                state is None
                or not state.active
                or all(arm.name != outcome.arm for arm in state.experiment.arms)
            ):
                self.discarded += 1
                continue
            previous = self._requests.get(outcome.request_id)
            if previous is not None:
                # A repeated request id replaces the earlier outcome (a client retry).
                previous.entries.pop(outcome.request_id, None)
            state.entries[outcome.request_id] = _Entry(outcome)
            self._requests[outcome.request_id] = state
            kept += 1
            while len(state.entries) > self.max_outcomes:
                request_id, _ = state.entries.popitem(last=False)
                if self._requests.get(request_id) is state:
                    del self._requests[request_id]
                state.dropped += 1
        return kept

    def feedback(
        self, request_id: str, label: int | None = None, score: float | None = None
    ) -> None:
        """Record the truth for one request: its class ``label`` or a ``score`` (exactly one).
        Feedback given again for the same request replaces the earlier one."""
        check_feedback(None, label, score)
        state = self._requests.get(request_id)
        entry = state.entries.get(request_id) if state is not None else None
        if entry is None:
            raise NotFoundError(
                f"no request '{request_id}' in any experiment (feedback is kept for the most "
                f"recent {self.max_outcomes} requests of each experiment)"
            )
        check_feedback(entry.outcome, label, score)
        entry.label = label
        entry.score = None if score is None else float(score)

    def update_agreement(
        self, source: str, model: str, variant: str, matched: float, rows: int
    ) -> None:
        """Take ``source``'s latest running totals of live shadow agreement for one variant:
        ``matched`` (agreeing rows, or summed cosine) out of ``rows``. Totals replace that
        source's previous ones; the ledger sums the latest totals over sources."""
        if rows < 0 or not math.isfinite(matched):
            raise InvalidArgumentError(
                f"agreement totals must be finite with rows >= 0, got {matched!r} / {rows!r}"
            )
        self._agreement.setdefault((model, variant), {})[source] = (float(matched), int(rows))

    def agreement(self, model: str, variant: str) -> tuple[float | None, int]:
        """Live agreement of ``variant`` with the reference and the rows behind it; None
        before any shadow comparison."""
        totals = self._agreement.get((model, variant), {}).values()
        rows = sum(r for _, r in totals)
        matched = math.fsum(m for m, _ in totals)
        return (matched / rows if rows else None), rows

    @property
    def requests_held(self) -> int:
        """Request ids feedback can be given for, over all experiments."""
        return len(self._requests)

    def report(self, name: str, confidence: float = DEFAULT_CONFIDENCE) -> ExperimentReport:
        """Compare every arm of ``name`` with its first arm at ``confidence``."""
        from gearbox.serving.experiment_report import ArmSample, build_report

        if not 0.0 < confidence < 1.0:
            raise InvalidArgumentError(
                f"confidence must be strictly between 0 and 1, got {confidence}"
            )
        state = self._state(name)
        experiment = state.experiment
        samples: list[ArmSample] = []
        by_arm: dict[str, list[_Entry]] = {arm.name: [] for arm in experiment.arms}
        for entry in state.entries.values():
            by_arm[entry.outcome.arm].append(entry)
        for arm in experiment.arms:
            entries = by_arm[arm.name]
            agreement, agreement_rows = self.agreement(experiment.model, arm.variant)
            samples.append(
                ArmSample(
                    name=arm.name,
                    variant=arm.variant,
                    weight=arm.weight,
                    latencies_ms=[e.outcome.latency_ms for e in entries],
                    budget_met=[
                        e.outcome.budget_met for e in entries if e.outcome.budget_met is not None
                    ],
                    correct=[
                        e.outcome.prediction == e.label for e in entries if e.label is not None
                    ],
                    scores=[e.score for e in entries if e.score is not None],
                    feedback=sum(e.has_feedback for e in entries),
                    agreement=agreement,
                    agreement_rows=agreement_rows,
                )
            )
        return build_report(
            experiment=experiment.name,
            model=experiment.model,
            active=state.active,
            confidence=confidence,
            arms=samples,
            evicted=state.dropped,
        )

    def _state(self, name: str) -> _State:
        state = self._states.get(name)
        if state is None:
            known = ", ".join(sorted(self._states)) or "none"
            raise NotFoundError(f"no experiment '{name}' (known: {known})")
        return state

    def _forget(self, state: _State) -> None:
        for request_id in state.entries:
            if self._requests.get(request_id) is state:
                del self._requests[request_id]
        del self._states[state.experiment.name]


__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_MAX_OUTCOMES",
    "NAME_PATTERN",
    "Arm",
    "Experiment",
    "ExperimentLedger",
    "Outcome",
    "assign",
    "key_point",
]
