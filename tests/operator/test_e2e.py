"""The real operator (``mailbridge-operator``, a subprocess) against the emulated API, driven by
the real kubectl: what a user sees after ``kubectl apply -f examples/mailbridge.yaml``.

Every test also checks, when the operator stops, that each request it made is
allowed by :data:`mailbridge_operator.rbac.RULES` (see ``conftest.operator``).
"""

from __future__ import annotations

import copy
import json
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from emulator import SERVICE_MONITOR_CRD, Cluster, OperatorProcess

from mailbridge_operator import model, render

pytestmark = pytest.mark.timeout(60)

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mailbridge.yaml"
MAILBRIDGES = "mailbridge.io/v1alpha1/mailbridges"
NAMESPACE = "default"


def mailbridge(cluster: Cluster, name: str = "inbound") -> dict[str, Any]:
    found = cluster.get(MAILBRIDGES, NAMESPACE, name)
    assert found is not None, f"MailBridge {name} is gone"
    return found


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (obj.get("status") or {}).get("conditions", []):
        if item["type"] == kind:
            return item  # type: ignore[no-any-return]
    return {}


def config_hash(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["annotations"][render.HASH_ANNOTATION])


def wait(
    cluster: Cluster,
    operator: OperatorProcess,
    what: str,
    predicate: Callable[[], Any],
    timeout: float = 20,
) -> Any:
    return cluster.wait_for(predicate, timeout=timeout, what=what, details=operator.log)


def apply_example(cluster: Cluster, operator: OperatorProcess) -> dict[str, Any]:
    cluster.apply_file(EXAMPLE)
    return wait(
        cluster,
        operator,
        "the Deployment",
        lambda: cluster.get("apps/v1/deployments", NAMESPACE, "inbound"),
    )


def events(cluster: Cluster, name: str) -> list[tuple[str, str, str]]:
    result = cluster.kubectl(
        "get",
        "events",
        "-n",
        NAMESPACE,
        "-o",
        "json",
        f"--field-selector=involvedObject.name={name}",
    )
    return [(e["type"], e["reason"], e["message"]) for e in json.loads(result.stdout)["items"]]


def test_applying_the_example_creates_owned_children(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    apply_example(cluster, operator)
    owner = mailbridge(cluster)
    expected = render.render(
        "inbound",
        NAMESPACE,
        model.parse(owner["spec"]),
        {
            "mailbridge-webhooks": cluster.get("v1/secrets", NAMESPACE, "mailbridge-webhooks")[  # type: ignore[index]
                "metadata"
            ]["resourceVersion"]
        },
    )
    resources = {
        "ConfigMap": "v1/configmaps",
        "Service": "v1/services",
        "Deployment": "apps/v1/deployments",
        "PodDisruptionBudget": "policy/v1/poddisruptionbudgets",
    }
    for manifest in expected:
        name = manifest["metadata"]["name"]
        live = wait(
            cluster,
            operator,
            f"{manifest['kind']} {name}",
            lambda m=manifest: cluster.get(resources[m["kind"]], NAMESPACE, m["metadata"]["name"]),
        )
        assert [
            {
                "apiVersion": "mailbridge.io/v1alpha1",
                "kind": "MailBridge",
                "name": "inbound",
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ] == live["metadata"]["ownerReferences"]
        assert manifest["metadata"]["labels"].items() <= live["metadata"]["labels"].items()
        if manifest["kind"] == "ConfigMap":
            assert manifest["data"] == live["data"]
        if manifest["kind"] == "Deployment":
            assert manifest["spec"] == live["spec"]

    status = wait(
        cluster,
        operator,
        "a status",
        lambda: (
            mailbridge(cluster).get("status", {}).get("configHash")
            and mailbridge(cluster)["status"]
        ),
    )
    assert (1, 2, "Deployment/inbound") == (
        status["observedGeneration"],
        status["routes"],
        status["workload"],
    )
    assert "False" == condition(mailbridge(cluster), "Ready")["status"]
    assert ("Normal", "Created", "Created Deployment inbound") in wait(
        cluster, operator, "Created events", lambda: events(cluster, "inbound")
    )


def test_a_ready_deployment_makes_the_mailbridge_ready(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    apply_example(cluster, operator)
    cluster.mark_rolled_out(NAMESPACE, "Deployment", "inbound")
    cluster.kubectl(
        "wait", "--for=condition=Ready", "mailbridge/inbound", "--timeout=20s", timeout=30
    )
    owner = mailbridge(cluster)
    assert (2, 2) == (owner["status"]["readyReplicas"], owner["status"]["replicas"])
    assert ("False", "RolloutComplete") == (
        condition(owner, "Progressing")["status"],
        condition(owner, "Progressing")["reason"],
    )
    header, row = cluster.kubectl("get", "mb", "inbound").stdout.splitlines()
    assert ["NAME", "READY", "REPLICAS", "ROUTES", "AGE"] == header.split()
    assert ["inbound", "True", "2", "2"] == row.split()[:4]
    wide = cluster.kubectl("get", "mailbridges", "-o", "wide").stdout.split()
    assert "REASON" in wide and "AllReplicasReady" in wide
    assert ("Normal", "Ready", "every replica is ready to accept mail") in wait(
        cluster, operator, "the Ready event", lambda: events(cluster, "inbound")
    )


def test_changing_a_route_rewrites_the_config_and_rolls_the_pods(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    before = apply_example(cluster, operator)
    cluster.kubectl(
        "patch",
        "mailbridge",
        "inbound",
        "--type=json",
        "-p",
        json.dumps(
            [{"op": "add", "path": "/spec/routes/0/recipients/-", "value": "sales@example.com"}]
        ),
    )

    def config() -> dict[str, Any] | None:
        live = cluster.get("v1/configmaps", NAMESPACE, "inbound-config")
        return yaml.safe_load(live["data"][render.CONFIG_KEY]) if live else None

    wait(
        cluster,
        operator,
        "the new recipient in the ConfigMap",
        lambda: (
            "sales@example.com" in (config() or {"routes": [{}]})["routes"][0].get("recipients", [])
        ),
    )
    after = wait(
        cluster,
        operator,
        "a new pod-template hash",
        lambda: (
            (d := cluster.get("apps/v1/deployments", NAMESPACE, "inbound"))
            and config_hash(d) != config_hash(before)
            and d
        ),
    )
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    status = wait(
        cluster,
        operator,
        "observedGeneration 2",
        lambda: (
            mailbridge(cluster)["status"]["observedGeneration"] == 2
            and mailbridge(cluster)["status"]
        ),
    )
    assert config_hash(after) == status["configHash"]


def test_rotating_a_referenced_secret_rolls_the_pods(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    before = apply_example(cluster, operator)
    config_before = cluster.get("v1/configmaps", NAMESPACE, "inbound-config")
    cluster.kubectl(
        "patch",
        "secret",
        "mailbridge-webhooks",
        "--type=merge",
        "-p",
        json.dumps({"stringData": {"support": "whsec_cm90YXRlZC1zdXBwb3J0LXNpZ25pbmcta2V5"}}),
    )
    wait(
        cluster,
        operator,
        "a new pod-template hash",
        lambda: (
            config_hash(cluster.get("apps/v1/deployments", NAMESPACE, "inbound"))
            != config_hash(before)
        ),
    )  # type: ignore[arg-type]
    config_after = cluster.get("v1/configmaps", NAMESPACE, "inbound-config")
    assert config_before["data"] == config_after["data"]  # type: ignore[index]
    assert (
        config_before["metadata"]["resourceVersion"]
        == (  # type: ignore[index]
            config_after["metadata"]["resourceVersion"]
        )
    )  # type: ignore[index]


def test_deleted_and_edited_children_come_back(cluster: Cluster, operator: OperatorProcess) -> None:
    deployment = apply_example(cluster, operator)
    config_map = cluster.get("v1/configmaps", NAMESPACE, "inbound-config")
    cluster.kubectl("delete", "configmap", "inbound-config")
    cluster.kubectl("delete", "service", "inbound")
    restored = wait(
        cluster,
        operator,
        "the ConfigMap back",
        lambda: (c := cluster.get("v1/configmaps", NAMESPACE, "inbound-config")) and c,
    )
    assert restored["metadata"]["uid"] != config_map["metadata"]["uid"]  # type: ignore[index]
    assert restored["data"] == config_map["data"]  # type: ignore[index]
    wait(
        cluster,
        operator,
        "the Service back",
        lambda: cluster.get("v1/services", NAMESPACE, "inbound"),
    )

    cluster.kubectl("set", "image", "deployment/inbound", "mailbridge=evil.example/miner:1")
    wait(
        cluster,
        operator,
        "the image restored",
        lambda: (
            cluster.get("apps/v1/deployments", NAMESPACE, "inbound")["spec"]["template"]["spec"][  # type: ignore[index]
                "containers"
            ][0]["image"]
            == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        ),
    )


def test_deleting_the_mailbridge_collects_its_children(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    apply_example(cluster, operator)
    wait(
        cluster,
        operator,
        "the PodDisruptionBudget",
        lambda: cluster.get("policy/v1/poddisruptionbudgets", NAMESPACE, "inbound"),
    )
    cluster.kubectl("delete", "mailbridge", "inbound", "--timeout=20s", timeout=30)
    for resource, name in (
        ("v1/configmaps", "inbound-config"),
        ("v1/services", "inbound"),
        ("v1/services", "inbound-headless"),
        ("apps/v1/deployments", "inbound"),
        ("policy/v1/poddisruptionbudgets", "inbound"),
    ):
        wait(
            cluster,
            operator,
            f"{resource} {name} collected",
            lambda r=resource, n=name: cluster.get(r, NAMESPACE, n) is None,
        )
    assert cluster.get("v1/secrets", NAMESPACE, "mailbridge-webhooks") is not None  # not ours


def test_an_invalid_spec_is_reported_and_recovers_when_fixed(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    bridge = documents[1]
    bridge["spec"]["routes"][0]["recipients"] = ["not an address"]  # valid for the CRD only
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
    degraded = wait(
        cluster,
        operator,
        "Degraded=True",
        lambda: (
            condition(mailbridge(cluster), "Degraded").get("status") == "True"
            and condition(mailbridge(cluster), "Degraded")
        ),
    )
    assert "InvalidSpec" == degraded["reason"]
    assert degraded["message"].startswith("spec.routes[0].recipients:")
    assert any(
        kind == "Warning" and reason == "InvalidSpec"
        for kind, reason, _ in wait(
            cluster, operator, "the InvalidSpec event", lambda: events(cluster, "inbound")
        )
    )
    assert cluster.get("apps/v1/deployments", NAMESPACE, "inbound") is None
    assert operator.process.poll() is None

    cluster.kubectl(
        "patch",
        "mailbridge",
        "inbound",
        "--type=json",
        "-p",
        json.dumps(
            [{"op": "replace", "path": "/spec/routes/0/recipients", "value": ["ok@example.com"]}]
        ),
    )
    wait(
        cluster,
        operator,
        "the Deployment",
        lambda: cluster.get("apps/v1/deployments", NAMESPACE, "inbound"),
    )
    wait(
        cluster,
        operator,
        "Degraded=False",
        lambda: condition(mailbridge(cluster), "Degraded").get("status") == "False",
    )


def test_persistence_moves_the_bridges_to_a_statefulset(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    apply_example(cluster, operator)
    cluster.kubectl(
        "patch",
        "mailbridge",
        "inbound",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "spec": {
                    "persistence": {"enabled": True, "size": "2Gi"},
                    "delivery": {"mode": "spool"},
                }
            }
        ),
    )
    sts = wait(
        cluster,
        operator,
        "the StatefulSet",
        lambda: cluster.get("apps/v1/statefulsets", NAMESPACE, "inbound"),
    )
    assert (
        "2Gi" == sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    )
    wait(
        cluster,
        operator,
        "the Deployment removed",
        lambda: cluster.get("apps/v1/deployments", NAMESPACE, "inbound") is None,
    )
    cluster.mark_rolled_out(NAMESPACE, "StatefulSet", "inbound")
    wait(
        cluster,
        operator,
        "Ready via the StatefulSet",
        lambda: condition(mailbridge(cluster), "Ready").get("status") == "True",
    )
    assert "StatefulSet/inbound" == mailbridge(cluster)["status"]["workload"]


def test_a_refused_child_is_reported_and_the_rest_still_applied(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    """kmock's reaction DSL still works on the emulator: here the API forbids the PDB."""
    refusal = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": 403,
        "reason": "Forbidden",
        "message": "poddisruptionbudgets is forbidden",
    }
    path = f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets/inbound"
    cluster.call(lambda: cluster.emulator[f"patch {path}"] << 403 << refusal)
    apply_example(cluster, operator)
    degraded = wait(
        cluster,
        operator,
        "Degraded=ApplyFailed",
        lambda: (
            condition(mailbridge(cluster), "Degraded").get("reason") == "ApplyFailed"
            and condition(mailbridge(cluster), "Degraded")
        ),
    )
    assert "PodDisruptionBudget inbound" in degraded["message"]
    assert "forbidden" in degraded["message"]
    assert cluster.get("v1/services", NAMESPACE, "inbound") is not None
    assert any(
        kind == "Warning" and reason == "ApplyFailed"
        for kind, reason, _ in wait(
            cluster, operator, "the ApplyFailed event", lambda: events(cluster, "inbound")
        )
    )
    assert operator.process.poll() is None


CHILDREN = (
    ("v1/configmaps", "inbound-config"),
    ("v1/services", "inbound"),
    ("v1/services", "inbound-headless"),
    ("apps/v1/deployments", "inbound"),
    ("policy/v1/poddisruptionbudgets", "inbound"),
)


def test_a_mailbridge_is_deleted_even_when_no_operator_runs(
    cluster: Cluster, start_operator: Callable[..., OperatorProcess]
) -> None:
    """No finalizer: deleting a MailBridge (or its namespace) never waits for the operator."""
    operator = start_operator("--all-namespaces")
    apply_example(cluster, operator)
    for resource, name in CHILDREN:
        wait(
            cluster,
            operator,
            f"{resource} {name}",
            lambda r=resource, n=name: cluster.get(r, NAMESPACE, n),
        )
    # kopf adds any finalizer of its own before it runs a handler, so once the status
    # is written the MailBridge has every finalizer it will ever get.
    wait(cluster, operator, "a status", lambda: mailbridge(cluster).get("status"))
    assert [] == mailbridge(cluster)["metadata"].get("finalizers", [])
    assert 0 == operator.stop()

    cluster.kubectl("delete", "mailbridge", "inbound", "--timeout=10s", timeout=20)
    assert cluster.get(MAILBRIDGES, NAMESPACE, "inbound") is None
    for resource, name in CHILDREN:
        cluster.wait_for(
            lambda r=resource, n=name: cluster.get(r, NAMESPACE, n) is None,
            timeout=5,
            what=f"{resource} {name} collected",
        )


def test_the_finalizer_an_older_operator_left_is_removed(
    cluster: Cluster, start_operator: Callable[..., OperatorProcess]
) -> None:
    """MailBridges served by a version with the resync timer get released on upgrade."""
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    documents[1]["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
    operator = start_operator("--all-namespaces")
    wait(
        cluster,
        operator,
        "the old finalizer removed",
        lambda: not mailbridge(cluster)["metadata"].get("finalizers"),
    )
    wait(
        cluster,
        operator,
        "the Deployment",
        lambda: cluster.get("apps/v1/deployments", NAMESPACE, "inbound"),
    )
    assert not mailbridge(cluster)["metadata"].get("finalizers")


def test_the_resync_restores_what_no_watch_sees(
    cluster: Cluster, start_operator: Callable[..., OperatorProcess]
) -> None:
    """ServiceMonitors are not watched: the periodic resync puts them back, with an event."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    operator = start_operator("--all-namespaces", "--resync-interval=1")
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    documents[1]["spec"]["monitoring"] = {"serviceMonitor": {"enabled": True}}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
    monitors = "monitoring.coreos.com/v1/servicemonitors"
    monitor = wait(
        cluster, operator, "the ServiceMonitor", lambda: cluster.get(monitors, NAMESPACE, "inbound")
    )
    wait(
        cluster,
        operator,
        "the Deployment",
        lambda: cluster.get("apps/v1/deployments", NAMESPACE, "inbound"),
    )
    # Settled: no handler of kopf's is left to retry, only the resync can act now.
    cluster.mark_rolled_out(NAMESPACE, "Deployment", "inbound")
    wait(
        cluster,
        operator,
        "Ready",
        lambda: condition(mailbridge(cluster), "Ready").get("status") == "True",
    )

    cluster.kubectl(
        "patch",
        "servicemonitors.monitoring.coreos.com",
        "inbound",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"endpoints": [{"port": "smtp"}]}}),
    )
    wait(
        cluster,
        operator,
        "the endpoints restored",
        lambda: cluster.get(monitors, NAMESPACE, "inbound")["spec"] == monitor["spec"],
        timeout=10,
    )  # type: ignore[index]
    cluster.kubectl("delete", "servicemonitors.monitoring.coreos.com", "inbound")
    wait(
        cluster,
        operator,
        "the ServiceMonitor recreated",
        lambda: cluster.get(monitors, NAMESPACE, "inbound"),
        timeout=10,
    )
    seen = wait(
        cluster,
        operator,
        "the events",
        lambda: (
            (found := events(cluster, "inbound"))
            and ("Normal", "Updated", "Updated ServiceMonitor inbound") in found
            and found.count(("Normal", "Created", "Created ServiceMonitor inbound")) == 2
            and found
        ),
    )
    assert ("Normal", "Ready", "every replica is ready to accept mail") in seen
    assert [] == mailbridge(cluster)["metadata"].get("finalizers", [])


def test_bridges_run_the_image_the_operator_was_given_unless_their_spec_names_one(
    cluster: Cluster, start_operator: Callable[..., OperatorProcess]
) -> None:
    mirrored = "registry.example/mirror/mailbridge:9.9.9"
    operator = start_operator(
        "--all-namespaces", env={"MAILBRIDGE_OPERATOR_BRIDGE_IMAGE": mirrored}
    )
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    pinned = copy.deepcopy(documents[1])
    pinned["metadata"]["name"] = "pinned"
    pinned["spec"]["image"] = "ghcr.io/mailbridge/mailbridge:0.0.9"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([*documents, pinned]))

    def image(name: str) -> str | None:
        found = cluster.get("apps/v1/deployments", NAMESPACE, name)
        return found["spec"]["template"]["spec"]["containers"][0]["image"] if found else None

    wait(cluster, operator, "the Deployments", lambda: image("inbound") and image("pinned"))
    assert (mirrored, "ghcr.io/mailbridge/mailbridge:0.0.9") == (image("inbound"), image("pinned"))
    labels = cluster.get("apps/v1/deployments", NAMESPACE, "inbound")["metadata"]["labels"]  # type: ignore[index]
    assert "9.9.9" == labels["app.kubernetes.io/version"]
