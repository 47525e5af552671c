"""status: conditions Ready / Progressing / Degraded from what the operator observed."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from mailbridge_operator import status

NOW = datetime.datetime(2026, 11, 21, 12, 0, 0, tzinfo=datetime.UTC)
LATER = NOW + datetime.timedelta(minutes=5)


def deployment(
    *,
    generation: int = 2,
    observed: int | None = 2,
    replicas: int = 2,
    ready: int = 2,
    updated: int = 2,
    spec_replicas: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    observed_status: dict[str, Any] = {
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
    }
    if observed is not None:
        observed_status["observedGeneration"] = observed
    if conditions:
        observed_status["conditions"] = conditions
    return {
        "kind": "Deployment",
        "metadata": {"name": "mx", "generation": generation},
        "spec": {"replicas": spec_replicas},
        "status": observed_status,
    }


def summary(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in result["conditions"]}


def observe(**fields: Any) -> status.Observation:
    return status.Observation(**({"generation": 4, "desired_replicas": 2, "routes": 3} | fields))


CASES = {
    "no workload yet": (
        observe(),
        {
            "Ready": ("False", "Creating"),
            "Progressing": ("True", "Creating"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "all ready": (
        observe(workload=deployment()),
        {
            "Ready": ("True", "AllReplicasReady"),
            "Progressing": ("False", "RolloutComplete"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "new template not seen": (
        observe(workload=deployment(generation=3, observed=2)),
        {
            "Ready": ("True", "AllReplicasReady"),
            "Progressing": ("True", "RollingOut"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "half updated": (
        observe(workload=deployment(updated=1, replicas=3, ready=2)),
        {
            "Ready": ("True", "AllReplicasReady"),
            "Progressing": ("True", "RollingOut"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "old pods terminating": (
        observe(workload=deployment(replicas=3)),
        {
            "Ready": ("True", "AllReplicasReady"),
            "Progressing": ("True", "RollingOut"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "one not ready": (
        observe(workload=deployment(ready=1)),
        {
            "Ready": ("False", "ReplicasNotReady"),
            "Progressing": ("False", "RolloutComplete"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "none ready": (
        observe(workload=deployment(ready=0)),
        {
            "Ready": ("False", "NoReplicasReady"),
            "Progressing": ("False", "RolloutComplete"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "scaled to zero": (
        observe(
            desired_replicas=0, workload=deployment(replicas=0, ready=0, updated=0, spec_replicas=0)
        ),
        {
            "Ready": ("False", "ScaledToZero"),
            "Progressing": ("False", "RolloutComplete"),
            "Degraded": ("False", "AsExpected"),
        },
    ),
    "invalid spec, old pods run": (
        status.Observation(4, workload=deployment(), problems=["spec.replicas: bad", "x: y"]),
        {
            "Ready": ("True", "AllReplicasReady"),
            "Progressing": ("False", "InvalidSpec"),
            "Degraded": ("True", "InvalidSpec"),
        },
    ),
    "invalid spec, nothing runs": (
        status.Observation(1, problems=["spec: bad"]),
        {
            "Ready": ("False", "InvalidSpec"),
            "Progressing": ("False", "InvalidSpec"),
            "Degraded": ("True", "InvalidSpec"),
        },
    ),
    "missing secret": (
        observe(workload=deployment(ready=0), missing_secrets=["hooks"]),
        {
            "Ready": ("False", "NoReplicasReady"),
            "Progressing": ("False", "RolloutComplete"),
            "Degraded": ("True", "SecretNotFound"),
        },
    ),
    "apply refused": (
        observe(workload=deployment(), apply_error="ServiceMonitor mx: 404"),
        {
            "Ready": ("True", "AllReplicasReady"),
            "Progressing": ("False", "ApplyFailed"),
            "Degraded": ("True", "ApplyFailed"),
        },
    ),
    "rollout stuck": (
        observe(
            workload=deployment(
                updated=1,
                ready=1,
                conditions=[
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": "ReplicaSet mx-1 has timed out progressing.",
                    }
                ],
            )
        ),
        {
            "Ready": ("False", "ReplicasNotReady"),
            "Progressing": ("True", "RollingOut"),
            "Degraded": ("True", "RolloutStuck"),
        },
    ),
    "replica failure": (
        observe(
            workload=deployment(
                ready=0,
                conditions=[
                    {
                        "type": "ReplicaFailure",
                        "status": "True",
                        "reason": "FailedCreate",
                        "message": "pods forbidden",
                    }
                ],
            )
        ),
        {
            "Ready": ("False", "NoReplicasReady"),
            "Progressing": ("False", "RolloutComplete"),
            "Degraded": ("True", "ReplicaFailure"),
        },
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_conditions(name: str) -> None:
    observation, expected = CASES[name]
    assert expected == summary(status.compute(observation, now=NOW))


def test_counts_generation_and_summary_fields() -> None:
    result = status.compute(observe(workload=deployment(ready=1), config_hash="abc"), now=NOW)
    assert {
        "observedGeneration": 4,
        "replicas": 2,
        "readyReplicas": 1,
        "updatedReplicas": 2,
        "routes": 3,
        "workload": "Deployment/mx",
        "configHash": "abc",
    } == {k: v for k, v in result.items() if k != "conditions"}
    ready = status.condition(result, "Ready")
    assert ready is not None
    assert ("1/2 replicas ready", 4, "2026-11-21T12:00:00Z") == (
        ready["message"],
        ready["observedGeneration"],
        ready["lastTransitionTime"],
    )


def test_transition_time_moves_only_when_the_status_changes() -> None:
    first = status.compute(observe(workload=deployment(ready=1)), now=NOW)
    same = status.compute(observe(workload=deployment(ready=0)), now=LATER, previous=first)
    assert "2026-11-21T12:00:00Z" == status.condition(same, "Ready")["lastTransitionTime"]  # type: ignore[index]
    assert "NoReplicasReady" == status.condition(same, "Ready")["reason"]  # type: ignore[index]
    flipped = status.compute(observe(workload=deployment()), now=LATER, previous=same)
    assert "2026-11-21T12:05:00Z" == status.condition(flipped, "Ready")["lastTransitionTime"]  # type: ignore[index]


def test_invalid_spec_message_counts_further_problems() -> None:
    result = status.compute(
        status.Observation(1, problems=["a: one", "b: two", "c: three"]), now=NOW
    )
    assert "a: one (and 2 more problems)" == status.condition(result, "Degraded")["message"]  # type: ignore[index]


def test_an_invalid_spec_keeps_the_last_known_routes_and_hash() -> None:
    previous = {"routes": 3, "configHash": "abc"}
    result = status.compute(status.Observation(5, problems=["x: y"]), now=NOW, previous=previous)
    assert (3, "abc", 5) == (result["routes"], result["configHash"], result["observedGeneration"])


def test_statefulset_revisions_count_as_rollout() -> None:
    sts = deployment() | {"kind": "StatefulSet"}
    sts["status"] |= {"currentRevision": "mx-1", "updateRevision": "mx-2"}
    result = status.compute(observe(workload=sts), now=NOW)
    assert ("True", "RollingOut") == summary(result)["Progressing"]
    assert "StatefulSet/mx" == result["workload"]


def test_is_true() -> None:
    result = status.compute(observe(workload=deployment()), now=NOW)
    assert status.is_true(result, "Ready")
    assert not status.is_true(result, "Degraded")
    assert not status.is_true({}, "Ready")
