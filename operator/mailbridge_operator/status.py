"""A MailBridge's status, computed from what the operator observed.

``compute(observation, now=..., previous=...)`` turns the observed children
(the Deployment or StatefulSet), the spec's problems, the Secrets that are
missing and any apply failure into the ``status`` the operator writes:
``observedGeneration``, replica counts, the number of routes, the config hash,
and three conditions with CamelCase reasons and human messages:

- ``Ready``: every desired replica is ready to accept mail.
- ``Progressing``: the workload has not yet rolled out the current spec.
- ``Degraded``: something needs a human (invalid spec, missing Secret, a
  refused apply, a stuck rollout).

A condition keeps its ``lastTransitionTime`` while its status does not change.
Pure: the clock is passed in; no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one reconciliation saw and did."""

    generation: int | None
    desired_replicas: int | None = None  # None when the spec is invalid
    routes: int | None = None
    workload: Mapping[str, Any] | None = None  # the Deployment or StatefulSet, as read
    config_hash: str | None = None
    problems: Sequence[str] = ()  # the spec's problems (InvalidSpecError.problems)
    missing_secrets: Sequence[str] = ()
    apply_error: str | None = None


@dataclasses.dataclass(frozen=True)
class _Condition:
    status: bool
    reason: str
    message: str


def compute(
    observation: Observation,
    *,
    now: datetime.datetime,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full ``status`` to write (conditions keep their transition times when unchanged)."""
    previous = previous or {}
    workload = observation.workload
    counts = _counts(workload)
    status: dict[str, Any] = {"observedGeneration": observation.generation, **counts}
    if observation.routes is not None:
        status["routes"] = observation.routes
    elif "routes" in previous:
        status["routes"] = previous["routes"]
    if workload is not None:
        metadata = workload.get("metadata", {})
        status["workload"] = f"{workload.get('kind')}/{metadata.get('name')}"
    hash_ = observation.config_hash or previous.get("configHash")
    if hash_:
        status["configHash"] = hash_

    conditions = {
        READY: _ready(observation, counts),
        PROGRESSING: _progressing(observation, counts),
        DEGRADED: _degraded(observation),
    }
    old = {c.get("type"): c for c in previous.get("conditions", []) if isinstance(c, Mapping)}
    status["conditions"] = [
        _render(kind, condition, old.get(kind), observation.generation, now)
        for kind, condition in conditions.items()
    ]
    return status


def condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The condition of that type in a status, if any."""
    for item in status.get("conditions", []):
        if item.get("type") == kind:
            return item  # type: ignore[no-any-return]
    return None


def is_true(status: Mapping[str, Any], kind: str) -> bool:
    found = condition(status, kind)
    return found is not None and found.get("status") == "True"


def _counts(workload: Mapping[str, Any] | None) -> dict[str, int]:
    observed = (workload or {}).get("status") or {}
    return {
        "replicas": int(observed.get("replicas") or 0),
        "readyReplicas": int(observed.get("readyReplicas") or 0),
        "updatedReplicas": int(observed.get("updatedReplicas") or 0),
    }


def _rolled_out(workload: Mapping[str, Any], desired: int) -> tuple[bool, str]:
    observed = workload.get("status") or {}
    generation = workload.get("metadata", {}).get("generation")
    seen = observed.get("observedGeneration")
    if generation is not None and (seen is None or seen < generation):
        return False, f"the {workload.get('kind')} controller has not seen the new pod template yet"
    updated = int(observed.get("updatedReplicas") or 0)
    total = int(observed.get("replicas") or 0)
    if updated < desired:
        return False, f"{updated} of {desired} replicas run the current configuration"
    if total > desired:
        return False, f"{total - desired} old replicas are still terminating"
    if workload.get("kind") == "StatefulSet":
        current, update = observed.get("currentRevision"), observed.get("updateRevision")
        if current and update and current != update:
            return False, f"pods still move from revision {current} to {update}"
    return True, f"{desired} replicas run the current configuration"


def _ready(observation: Observation, counts: Mapping[str, int]) -> _Condition:
    workload, desired = observation.workload, observation.desired_replicas
    if workload is None:
        if observation.problems:
            return _Condition(False, "InvalidSpec", "the spec is invalid and nothing runs yet")
        return _Condition(False, "Creating", "the bridge pods are being created")
    if desired is None:  # invalid spec: judge the pods still running the last valid one
        desired = int((workload.get("spec") or {}).get("replicas") or 0)
    ready = counts["readyReplicas"]
    if desired == 0:
        return _Condition(False, "ScaledToZero", "replicas is 0: no pod accepts mail")
    if ready >= desired:
        return _Condition(True, "AllReplicasReady", f"{ready}/{desired} replicas ready")
    if ready == 0:
        return _Condition(False, "NoReplicasReady", f"0/{desired} replicas ready")
    return _Condition(False, "ReplicasNotReady", f"{ready}/{desired} replicas ready")


def _progressing(observation: Observation, counts: Mapping[str, int]) -> _Condition:
    if observation.problems:
        return _Condition(
            False, "InvalidSpec", "the spec is invalid: the last valid configuration keeps running"
        )
    if observation.apply_error:
        return _Condition(False, "ApplyFailed", observation.apply_error)
    workload = observation.workload
    if workload is None:
        return _Condition(True, "Creating", "the bridge pods are being created")
    done, message = _rolled_out(workload, observation.desired_replicas or 0)
    if done:
        return _Condition(False, "RolloutComplete", message)
    return _Condition(True, "RollingOut", message)


def _degraded(observation: Observation) -> _Condition:
    if observation.problems:
        first, rest = observation.problems[0], len(observation.problems) - 1
        more = f" (and {rest} more problem{'s' if rest > 1 else ''})" if rest else ""
        return _Condition(True, "InvalidSpec", f"{first}{more}")
    if observation.apply_error:
        return _Condition(True, "ApplyFailed", observation.apply_error)
    if observation.missing_secrets:
        listed = ", ".join(observation.missing_secrets)
        return _Condition(
            True, "SecretNotFound", f"Secret {listed} not found: pods cannot start until it exists"
        )
    for item in ((observation.workload or {}).get("status") or {}).get("conditions", []) or []:
        kind, state, reason = item.get("type"), item.get("status"), item.get("reason")
        if kind == "Progressing" and reason == "ProgressDeadlineExceeded":
            return _Condition(True, "RolloutStuck", item.get("message") or "rollout is stuck")
        if kind == "ReplicaFailure" and state == "True":
            return _Condition(True, "ReplicaFailure", item.get("message") or "pods cannot be made")
    return _Condition(False, "AsExpected", "no problem observed")


def _render(
    kind: str,
    current: _Condition,
    old: Mapping[str, Any] | None,
    generation: int | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    state = "True" if current.status else "False"
    if old is not None and old.get("status") == state and old.get("lastTransitionTime"):
        since = old["lastTransitionTime"]
    else:
        since = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = {
        "type": kind,
        "status": state,
        "reason": current.reason,
        "message": current.message,
        "lastTransitionTime": since,
    }
    if generation is not None:
        result["observedGeneration"] = generation
    return result
