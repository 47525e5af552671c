"""``helm install`` into the emulated API, the operator running as installed, then what a
user does next: ``kubectl apply`` the example, ``helm test``, ``helm upgrade``, ``helm uninstall``.

What this protects: the chart installs with helm 4 (server-side apply,
``--wait`` until the CRD is Established and the operator Available); the
operator, started with exactly the command and arguments of the installed
Deployment, turns the example MailBridge (and MailBridges from values) into
their children; every API request it makes is allowed by the RBAC objects
the chart installed, bound to its ServiceAccount — cluster-wide, and in
watch-some-namespaces mode with Roles only; ``helm test``'s Pod, run here,
gets an answer from the operator's liveness endpoint through its Service.
"""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import emulator
import pytest
import yaml
from chart_cluster import InstalledOperator, Rollout, refused_requests, run_test_pods
from chart_tools import CHART, CRD_PATH, EXAMPLE_PATH, VALUES_DIR, Helm

pytestmark = pytest.mark.timeout(120)

RELEASE, NAMESPACE = "mb", "mailbridge-system"
FULLNAME = "mb-mailbridge"
MAILBRIDGES = "mailbridge.io/v1alpha1/mailbridges"


class Installed:
    """A release of the chart in the emulated cluster, with helm pointed at it."""

    def __init__(self, helm: Helm, cluster: emulator.Cluster) -> None:
        self.helm = helm
        self.cluster = cluster
        self.env = cluster.env() | {k: v for k, v in helm.env.items() if k.startswith("HELM_")}

    def run(self, *args: str, timeout: float = 60) -> str:
        """helm with the operator's Deployment played ready (for ``--wait``)."""
        with Rollout(self.cluster, NAMESPACE):
            result = subprocess.run(
                [self.helm.binary, *args],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=timeout,
                check=False,
            )
        assert 0 == result.returncode, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    def deployment(self) -> dict[str, Any]:
        found = self.cluster.get("apps/v1/deployments", NAMESPACE, FULLNAME)
        assert found is not None, "the operator's Deployment is not installed"
        return found


@pytest.fixture
def installed(helm: Helm, cluster: emulator.Cluster) -> Installed:
    return Installed(helm, cluster)


@pytest.fixture
def operator_log(tmp_path: pathlib.Path) -> Iterator[list[InstalledOperator]]:
    """Operators a test starts; each is stopped (SIGTERM) and must exit cleanly."""
    started: list[InstalledOperator] = []
    yield started
    for operator in started:
        code = operator.stop()
        print(f"--- operator log (exit {code}) ---\n{operator.log(200)}")
        assert 0 == code, "the operator did not stop cleanly on SIGTERM"


def children_of(cluster: emulator.Cluster, namespace: str, name: str) -> dict[str, Any]:
    kinds = {
        "ConfigMap": ("v1/configmaps", f"{name}-config"),
        "Service": ("v1/services", name),
        "headless Service": ("v1/services", f"{name}-headless"),
        "Deployment": ("apps/v1/deployments", name),
    }
    return {
        kind: cluster.get(resource, namespace, child) for kind, (resource, child) in kinds.items()
    }


def wait_for_children(
    cluster: emulator.Cluster, operator: InstalledOperator, namespace: str, name: str
) -> dict[str, Any]:
    owner = cluster.get(MAILBRIDGES, namespace, name)
    assert owner is not None
    children = cluster.wait_for(
        lambda: (c := children_of(cluster, namespace, name)) and all(c.values()) and c,
        timeout=30,
        what=f"the children of MailBridge {namespace}/{name}",
        details=operator.log,
    )
    for child in children.values():
        assert [owner["metadata"]["uid"]] == [
            ref["uid"] for ref in child["metadata"]["ownerReferences"]
        ]
    return children  # type: ignore[no-any-return]


def test_install_apply_the_example_test_upgrade_and_uninstall(
    installed: Installed,
    cluster: emulator.Cluster,
    tmp_path: pathlib.Path,
    operator_log: list[InstalledOperator],
) -> None:
    notes = installed.run(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout=60s",
    )
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}" in notes
    crd = cluster.get(
        "apiextensions.k8s.io/v1/customresourcedefinitions", None, "mailbridges.mailbridge.io"
    )
    assert crd is not None and crd["spec"] == yaml.safe_load(CRD_PATH.read_text())["spec"]

    operator = InstalledOperator(cluster, installed.deployment(), tmp_path / "operator.log")
    operator_log.append(operator)
    operator.wait_watching()
    assert ["--all-namespaces"] == [a for a in operator.args if "namespace" in a]

    cluster.kubectl("apply", "-n", "default", "-f", str(EXAMPLE_PATH))
    children = wait_for_children(cluster, operator, "default", "inbound")
    assert 2 == children["Deployment"]["spec"]["replicas"]
    cluster.wait_for(
        lambda: cluster.get("policy/v1/poddisruptionbudgets", "default", "inbound"),
        what="the PodDisruptionBudget",
        details=operator.log,
    )

    # `helm test`: its Pod asks the operator's liveness endpoint through the Service.
    helm_test = subprocess.Popen(
        [installed.helm.binary, "test", RELEASE, "-n", NAMESPACE, "--timeout=60s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=installed.env,
    )
    ran = run_test_pods(cluster, NAMESPACE, operator, helm_test)
    output, _ = helm_test.communicate(timeout=30)
    assert [f"{FULLNAME}-test"] == [name for name, _, _ in ran], output
    assert 0 == ran[0][1], ran[0][2]
    assert "/healthz: 200" in ran[0][2]
    assert 0 == helm_test.returncode, output
    assert "Succeeded" in output

    # An upgrade that changes the operator's pod rolls it (a new generation).
    before = installed.deployment()["metadata"]["generation"]
    installed.run(
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "operator.verbose=true",
        "--wait",
        "--timeout=60s",
    )
    after = installed.deployment()
    assert before + 1 == after["metadata"]["generation"]
    assert "--verbose" in after["spec"]["template"]["spec"]["containers"][0]["args"]

    assert [] == refused_requests(cluster, NAMESPACE, FULLNAME)
    assert refused_requests(cluster, NAMESPACE, "another-account"), "the check checks nothing"
    assert any(
        r.resource == "configmaps" and r.verb == "patch"
        for r in cluster.resource_requests("kopf/", "mailbridge-operator")
    )

    installed.run("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout=60s")
    assert cluster.get("apps/v1/deployments", NAMESPACE, FULLNAME) is None
    assert (
        cluster.get("rbac.authorization.k8s.io/v1/clusterroles", None, f"{NAMESPACE}-{FULLNAME}")
        is None
    )
    # Helm never deletes crds/: the CRD and users' MailBridges stay.
    assert cluster.get(MAILBRIDGES, "default", "inbound") is not None


def test_watching_some_namespaces_works_with_roles_only_there(
    installed: Installed,
    cluster: emulator.Cluster,
    tmp_path: pathlib.Path,
    operator_log: list[InstalledOperator],
) -> None:
    for namespace in ("team-a", "team-b", "elsewhere"):
        cluster.create_namespace(namespace)
    installed.run(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "-f",
        str(VALUES_DIR / "namespaced.yaml"),
        "--wait",
        "--timeout=60s",
    )
    roles = cluster.objects_of("rbac.authorization.k8s.io/v1/roles")
    assert ["team-a", "team-b"] == sorted(r["metadata"]["namespace"] for r in roles)

    operator = InstalledOperator(cluster, installed.deployment(), tmp_path / "operator.log")
    operator_log.append(operator)
    operator.wait_watching()
    assert ["--namespace=team-a", "--namespace=team-b"] == [
        a for a in operator.args if "namespace" in a
    ]

    # The MailBridge from values (team-a) and one applied to team-b get their children.
    wait_for_children(cluster, operator, "team-a", "inbound")
    cluster.kubectl("apply", "-n", "team-b", "-f", str(EXAMPLE_PATH))
    wait_for_children(cluster, operator, "team-b", "inbound")
    # One outside the watched namespaces is left alone.
    cluster.kubectl("apply", "-n", "elsewhere", "-f", str(EXAMPLE_PATH))
    wait_for_children(cluster, operator, "team-b", "inbound")  # a pass after the apply
    assert not any(children_of(cluster, "elsewhere", "inbound").values())

    assert [] == refused_requests(cluster, NAMESPACE, FULLNAME)
    # Without its Roles the operator could not have done this: they are what it used.
    cluster_only = refused_requests(cluster, NAMESPACE, FULLNAME, with_roles=False)
    assert any("in team-a" in refused for refused in cluster_only), cluster_only

    # Uninstalling deletes the MailBridge from values (the operator, still running,
    # releases it) and the garbage collector its children.
    installed.run("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout=60s")
    assert cluster.get(MAILBRIDGES, "team-a", "inbound") is None
    cluster.wait_for(
        lambda: not any(children_of(cluster, "team-a", "inbound").values()),
        what="the children of the uninstalled MailBridge to be collected",
    )
    assert [] == cluster.objects_of("rbac.authorization.k8s.io/v1/roles")


def test_a_mailbridge_can_be_deleted_when_the_operator_is_gone(
    installed: Installed,
    cluster: emulator.Cluster,
    tmp_path: pathlib.Path,
    operator_log: list[InstalledOperator],
) -> None:
    installed.run(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout=60s",
    )
    operator = InstalledOperator(cluster, installed.deployment(), tmp_path / "operator.log")
    operator_log.append(operator)
    operator.wait_watching()
    cluster.kubectl("apply", "-n", "default", "-f", str(EXAMPLE_PATH))
    wait_for_children(cluster, operator, "default", "inbound")
    # Handled: kopf adds any finalizer of its own before it runs a handler.
    cluster.wait_for(
        lambda: (cluster.get(MAILBRIDGES, "default", "inbound") or {}).get("status"),
        what="the operator's status",
        details=operator.log,
    )
    assert 0 == operator.stop()  # the operator's pod is gone (uninstalled, evicted...)
    cluster.kubectl("delete", "mailbridge", "inbound", "-n", "default", "--wait=false")

    def finalizers() -> str:
        left = cluster.get(MAILBRIDGES, "default", "inbound") or {"metadata": {}}
        return f"finalizers: {left['metadata'].get('finalizers')}"

    cluster.wait_for(
        lambda: cluster.get(MAILBRIDGES, "default", "inbound") is None,
        timeout=5,
        what="the MailBridge to be deleted",
        details=finalizers,
    )
    cluster.wait_for(
        lambda: not any(children_of(cluster, "default", "inbound").values()),
        timeout=5,
        what="its children to be collected",
    )


def test_bridges_run_the_charts_image_unless_their_spec_names_one(
    installed: Installed,
    cluster: emulator.Cluster,
    tmp_path: pathlib.Path,
    operator_log: list[InstalledOperator],
) -> None:
    """A mirrored image.* reaches the bridges through the operator's environment."""
    installed.run(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "--set",
        "image.repository=registry.example/mirror/mailbridge",
        "--set",
        "image.tag=9.9.9",
        "--wait",
        "--timeout=60s",
    )
    deployment = installed.deployment()
    operator = InstalledOperator(cluster, deployment, tmp_path / "operator.log")
    operator_log.append(operator)
    operator.wait_watching()
    assert "registry.example/mirror/mailbridge:9.9.9" == operator.container["image"]

    documents = [d for d in yaml.safe_load_all(EXAMPLE_PATH.read_text()) if d]
    pinned = yaml.safe_load(yaml.safe_dump(documents[1]))
    pinned["metadata"]["name"] = "pinned"
    pinned["spec"]["image"] = "ghcr.io/mailbridge/mailbridge:0.0.9"
    cluster.kubectl(
        "apply", "-n", "default", "-f", "-", input=yaml.safe_dump_all([*documents, pinned])
    )
    images = {
        name: wait_for_children(cluster, operator, "default", name)["Deployment"]["spec"][
            "template"
        ]["spec"]["containers"][0]["image"]
        for name in ("inbound", "pinned")
    }
    assert {
        "inbound": "registry.example/mirror/mailbridge:9.9.9",
        "pinned": "ghcr.io/mailbridge/mailbridge:0.0.9",
    } == images
