"""The emulated API server: the semantics kopf, kubectl and helm rely on (tested with them)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import urllib.request
from typing import Any

import pytest
from emulator import KUBECTL, Cluster

pytestmark = pytest.mark.timeout(60)

HELM = KUBECTL.parent / "helm"


def kubectl_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def watch_lines(cluster: Cluster, path: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(cluster.url + path, timeout=10) as response:
        assert "application/json" == response.headers["Content-Type"]
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def test_objects_get_server_metadata_and_kind(cluster: Cluster) -> None:
    cluster.kubectl("create", "configmap", "settings", "--from-literal=a=1")  # protobuf body
    cluster.kubectl("create", "secret", "generic", "token", "--from-literal=t=x")
    listed = kubectl_json(cluster, "get", "configmaps,secrets")
    kinds = {(item["kind"], item["metadata"]["name"]) for item in listed["items"]}
    assert {("ConfigMap", "settings"), ("Secret", "token")} <= kinds
    config_map = kubectl_json(cluster, "get", "configmap", "settings")
    metadata = config_map["metadata"]
    assert {"uid", "resourceVersion", "creationTimestamp", "generation"} <= set(metadata)
    assert ("default", {"a": "1"}) == (metadata["namespace"], config_map["data"])
    assert "eA==" == kubectl_json(cluster, "get", "secret", "token")["data"]["t"]


def test_namespaces_are_required_and_their_deletion_cascades(cluster: Cluster) -> None:
    missing = cluster.kubectl("create", "configmap", "x", "-n", "nowhere", check=False)
    assert "not found" in missing.stderr
    cluster.create_namespace("team")
    cluster.kubectl("create", "configmap", "x", "-n", "team")
    cluster.kubectl("delete", "namespace", "team")
    assert cluster.get("v1/configmaps", "team", "x") is None


def test_label_and_field_selectors(cluster: Cluster) -> None:
    for name, tier in (("a", "web"), ("b", "mail"), ("c", "mail")):
        cluster.kubectl("create", "configmap", name)
        cluster.kubectl("label", "configmap", name, f"tier={tier}")
    names = cluster.kubectl(
        "get", "configmaps", "-l", "tier in (mail),tier!=web", "-o", "name"
    ).stdout.split()
    assert ["configmap/b", "configmap/c"] == names
    by_field = cluster.kubectl(
        "get", "configmaps", "--field-selector=metadata.name=a", "-o", "name"
    ).stdout.split()
    assert ["configmap/a"] == by_field


def test_a_watch_resumes_after_a_resource_version(cluster: Cluster) -> None:
    cluster.kubectl("create", "configmap", "before")
    with urllib.request.urlopen(cluster.url + "/api/v1/namespaces/default/configmaps") as listed:
        since = json.load(listed)["metadata"]["resourceVersion"]
    cluster.kubectl("create", "configmap", "after")
    cluster.kubectl("delete", "configmap", "before")
    events = watch_lines(
        cluster,
        f"/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={since}&timeoutSeconds=1",
    )
    assert [("ADDED", "after"), ("DELETED", "before")] == [
        (e["type"], e["object"]["metadata"]["name"]) for e in events
    ]
    fresh = watch_lines(
        cluster, "/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1"
    )
    assert [("ADDED", "after")] == [(e["type"], e["object"]["metadata"]["name"]) for e in fresh]
    streamed = watch_lines(
        cluster,
        "/api/v1/namespaces/default/configmaps?watch=true"
        "&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
        "&timeoutSeconds=1",
    )
    assert ["ADDED", "BOOKMARK"] == [e["type"] for e in streamed]


def deployment(name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "example/web:1",
                            "env": [{"name": "A", "value": "1"}],
                        },
                        {"name": "side", "image": "example/side:1"},
                    ]
                },
            },
        },
    }


def test_generation_status_subresource_and_no_op_writes(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(deployment()))
    first = kubectl_json(cluster, "get", "deployment", "web")
    cluster.kubectl("label", "deployment", "web", "team=mail")
    labelled = kubectl_json(cluster, "get", "deployment", "web")
    assert first["metadata"]["generation"] == labelled["metadata"]["generation"]
    cluster.kubectl("scale", "deployment", "web", "--replicas=3")
    scaled = kubectl_json(cluster, "get", "deployment", "web")
    assert first["metadata"]["generation"] + 1 == scaled["metadata"]["generation"]

    cluster.kubectl(
        "patch", "deployment", "web", "--type=merge", "-p", '{"status": {"readyReplicas": 3}}'
    )
    assert "readyReplicas" not in kubectl_json(cluster, "get", "deployment", "web").get(
        "status", {}
    )
    cluster.kubectl(
        "patch",
        "deployment",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"readyReplicas": 3}, "spec": {"replicas": 9}}',
    )
    patched = kubectl_json(cluster, "get", "deployment", "web")
    assert (3, 3) == (patched["status"]["readyReplicas"], patched["spec"]["replicas"])

    again = cluster.kubectl(
        "patch", "deployment", "web", "--type=merge", "-p", '{"spec": {"replicas": 3}}'
    ).stdout
    assert "no change" in again
    assert (
        patched["metadata"]["resourceVersion"]
        == kubectl_json(cluster, "get", "deployment", "web")["metadata"]["resourceVersion"]
    )


def test_strategic_merge_patch_merges_containers_by_name(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(deployment()))
    cluster.kubectl("set", "env", "deployment/web", "-c", "main", "B=2")
    cluster.kubectl("set", "image", "deployment/web", "side=example/side:2")
    containers = kubectl_json(cluster, "get", "deployment", "web")["spec"]["template"]["spec"][
        "containers"
    ]
    assert [("main", "example/web:1", ["A", "B"]), ("side", "example/side:2", [])] == [
        (c["name"], c["image"], [e["name"] for e in c.get("env", [])]) for c in containers
    ]


def test_client_side_apply_is_idempotent_and_tracks_removals(cluster: Cluster) -> None:
    manifest = deployment()
    assert "created" in cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest)).stdout
    assert "unchanged" in cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest)).stdout
    del manifest["spec"]["template"]["spec"]["containers"][1]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    containers = kubectl_json(cluster, "get", "deployment", "web")["spec"]["template"]["spec"][
        "containers"
    ]
    assert ["main"] == [c["name"] for c in containers]


def test_server_side_apply_owns_only_the_managers_fields(cluster: Cluster) -> None:
    manifest = deployment()
    manifest["metadata"]["labels"]["owned"] = "yes"
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=tool", "-f", "-", input=json.dumps(manifest)
    )
    cluster.kubectl("label", "deployment", "web", "by-hand=yes")
    del manifest["metadata"]["labels"]["owned"]
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=tool", "-f", "-", input=json.dumps(manifest)
    )
    labels = kubectl_json(cluster, "get", "deployment", "web")["metadata"]["labels"]
    assert {"app": "web", "by-hand": "yes"} == labels


def owned_config_map(name: str, owner: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": owner["metadata"]["name"],
                        "uid": owner["metadata"]["uid"],
                    }
                ],
            },
        }
    )


def test_garbage_collection_follows_owner_references(cluster: Cluster) -> None:
    cluster.kubectl("create", "configmap", "owner")
    owner = kubectl_json(cluster, "get", "configmap", "owner")
    cluster.kubectl("apply", "-f", "-", input=owned_config_map("child", owner))
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=owned_config_map("grandchild", kubectl_json(cluster, "get", "configmap", "child")),
    )
    cluster.kubectl("delete", "configmap", "owner")
    cluster.wait_for(
        lambda: cluster.get("v1/configmaps", "default", "grandchild") is None,
        what="the grandchild collected",
    )
    assert cluster.get("v1/configmaps", "default", "child") is None

    cluster.kubectl("create", "configmap", "parent")
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=owned_config_map("kept", kubectl_json(cluster, "get", "configmap", "parent")),
    )
    cluster.kubectl("delete", "configmap", "parent", "--cascade=orphan")
    kept = cluster.get("v1/configmaps", "default", "kept")
    assert kept is not None
    assert [] == kept["metadata"]["ownerReferences"]


def test_finalizers_hold_deletion_until_removed(cluster: Cluster) -> None:
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "held", "finalizers": ["example.com/hold"]},
            }
        ),
    )
    cluster.kubectl("delete", "configmap", "held", "--wait=false")
    held = cluster.get("v1/configmaps", "default", "held")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    bad = cluster.kubectl(
        "patch",
        "configmap",
        "held",
        "--type=json",
        "-p",
        json.dumps(
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
                {"op": "remove", "path": "/metadata/finalizers"},
            ]
        ),
        check=False,
    )
    assert 0 != bad.returncode  # a failed JSON-patch test is 422, as kopf expects
    cluster.kubectl(
        "patch", "configmap", "held", "--type=merge", "-p", '{"metadata": {"finalizers": null}}'
    )
    assert cluster.get("v1/configmaps", "default", "held") is None


def test_custom_resources_are_served_defaulted_and_validated(cluster: Cluster) -> None:
    crd = kubectl_json(cluster, "get", "crd", "mailbridges.mailbridge.io")
    assert {"NamesAccepted", "Established"} == {
        c["type"] for c in crd["status"]["conditions"] if c["status"] == "True"
    }
    resource = {
        "apiVersion": "mailbridge.io/v1alpha1",
        "kind": "MailBridge",
        "metadata": {"name": "mx"},
        "spec": {
            "routes": [{"name": "a", "recipients": ["*"], "webhook": {"url": "https://h.example/"}}]
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(resource))
    stored = kubectl_json(cluster, "get", "mb", "mx")  # the short name resolves
    assert ("sync", 2525) == (stored["spec"]["delivery"]["mode"], stored["spec"]["smtp"]["port"])
    resource["spec"]["replicas"] = -1
    refused = cluster.kubectl("apply", "-f", "-", input=json.dumps(resource), check=False)
    assert "spec.replicas" in refused.stderr
    resource["spec"]["replicas"] = 1
    resource["spec"]["delivery"] = {"mode": "spool"}
    refused = cluster.kubectl("apply", "-f", "-", input=json.dumps(resource), check=False)
    assert "persistence.enabled" in refused.stderr
    cluster.kubectl("delete", "crd", "mailbridges.mailbridge.io")
    assert cluster.get("mailbridge.io/v1alpha1/mailbridges", "default", "mx") is None


def test_helm_installs_upgrades_and_uninstalls_a_chart(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    """helm 4 (server-side apply, release Secrets as protobuf, --wait) works on the emulator."""
    assert HELM.exists(), f"{HELM} is missing: run scripts/setup"
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\ndata:\n"
        "  value: {{ .Values.value | quote }}\n"
    )
    (chart / "values.yaml").write_text("value: one\n")
    env = cluster.env(
        HELM_CACHE_HOME=str(tmp_path / "cache"),
        HELM_CONFIG_HOME=str(tmp_path / "config"),
        HELM_DATA_HOME=str(tmp_path / "data"),
    )

    def helm(*args: str) -> str:
        result = subprocess.run(
            [str(HELM), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert 0 == result.returncode, result.stderr
        return result.stdout

    helm("install", "demo", str(chart), "--wait", "--timeout=20s")
    assert {"value": "one"} == cluster.get("v1/configmaps", "default", "demo")["data"]  # type: ignore[index]
    helm("upgrade", "demo", str(chart), "--set", "value=two", "--wait", "--timeout=20s")
    assert {"value": "two"} == cluster.get("v1/configmaps", "default", "demo")["data"]  # type: ignore[index]
    assert "demo" in helm("list", "--short")
    helm("uninstall", "demo", "--wait")
    assert cluster.get("v1/configmaps", "default", "demo") is None
    assert [] == [
        s
        for s in cluster.objects_of("v1/secrets", "default")
        if s["metadata"]["name"].startswith("sh.helm.release")
    ]
