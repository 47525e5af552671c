"""render: the children of a MailBridge, for many specs, valid for Kubernetes 1.29 and 1.35."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mailbridge import config
from mailbridge_operator import model, render

K8S_VERSIONS = ("1.29.0", "1.35.0")


def spec(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "routes": [
            {
                "name": "main",
                "recipients": ["*@example.com"],
                "webhook": {
                    "url": "https://hooks.example.com/mail",
                    "signingSecretRef": {"name": "hooks", "key": "main"},
                },
            }
        ]
    }
    return base | fields


SPECS: dict[str, dict[str, Any]] = {
    "minimal": spec(),
    "persistent spool": spec(
        delivery={"mode": "spool"},
        persistence={
            "enabled": True,
            "size": "5Gi",
            "storageClassName": "fast",
            "accessModes": ["ReadWriteOncePod"],
        },
    ),
    "tls secret and requireTLS": spec(
        tls={"secretName": "mx-tls", "minVersion": "TLSv1.3"},
        smtp={"requireTLS": True, "hostname": "mx.example.com"},
    ),
    "load balancer": spec(
        service={
            "type": "LoadBalancer",
            "port": 2525,
            "nodePort": 30025,
            "externalTrafficPolicy": "Local",
            "loadBalancerSourceRanges": ["203.0.113.0/24"],
            "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
            "proxyProtocol": {"enabled": True, "trustedCIDRs": ["10.0.0.0/8"], "timeout": "2s"},
        }
    ),
    "monitoring and pdb": spec(
        monitoring={
            "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}
        },
        podDisruptionBudget={"enabled": True, "minAvailable": "50%"},
        replicas=3,
    ),
    "scheduling and extras": spec(
        scheduling={
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {
                                    "matchLabels": {"app.kubernetes.io/instance": "mx"}
                                },
                            },
                        }
                    ]
                }
            },
            "priorityClassName": "high",
        },
        env=[
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4318"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        imagePullSecrets=[{"name": "regcred"}],
        serviceAccountName="mailbridge",
        image="registry.example/mailbridge@sha256:" + "a" * 64,
        imagePullPolicy="Always",
        podAnnotations={"example.com/team": "mail"},
        podLabels={"team": "mail"},
        resources={
            "requests": {"cpu": "250m", "memory": "128Mi"},
            "limits": {"cpu": 1, "memory": "1Gi"},
        },
    ),
    "no tls, no secrets": spec(
        tls={"enabled": False},
        routes=[
            {"name": "open", "recipients": ["*"], "webhook": {"url": "http://receiver.local/x"}}
        ],
    ),
    "many routes with rotation": spec(
        routes=[
            {
                "name": f"r{i}",
                "recipients": [f"user{i}@example.com", f"*@d{i}.example"],
                "webhook": {
                    "url": f"https://hooks.example/{i}",
                    "timeout": "3s",
                    "headers": {"X-Route": str(i)},
                    "signingSecretRef": {"name": "hooks", "key": f"r{i}"},
                    "additionalSigningSecretRefs": [{"name": "old-hooks", "key": f"r{i}"}],
                },
            }
            for i in range(12)
        ]
    ),
    "scaled to zero": spec(replicas=0),
}


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{m['kind']}/{m['metadata']['name']}": m for m in manifests}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_strictly_valid_kubernetes(name: str, version: str) -> None:
    for manifest in render.render("mx", "mail", SPECS[name], {"hooks": "7"}):
        if manifest["kind"] == "ServiceMonitor":
            continue  # not a core kind; checked in test_service_monitor_selects_the_metrics_port
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_bridge_loads_the_rendered_config_unchanged(
    name: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap is exactly what the bridge reads through MAILBRIDGE_CONFIG."""
    manifests = render.render("mx", "mail", SPECS[name], {})
    text = manifests[0]["data"][render.CONFIG_KEY]
    (tmp_path / "mailbridge.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("MAILBRIDGE_CONFIG", str(tmp_path / "mailbridge.yaml"))
    loaded = config.load()
    expected = render.bridge_settings("mx", "mail", model.parse(SPECS[name]))
    assert expected.model_dump(exclude={"config"}) == loaded.model_dump(exclude={"config"})


def test_children_names_kinds_and_labels() -> None:
    manifests = render.render("mx", "mail", SPECS["monitoring and pdb"], {})
    assert [
        "ConfigMap/mx-config",
        "Service/mx",
        "Service/mx-headless",
        "Deployment/mx",
        "ServiceMonitor/mx",
        "PodDisruptionBudget/mx",
    ] == list(by_kind(manifests))
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        assert {
            "app.kubernetes.io/name": "mailbridge",
            "app.kubernetes.io/instance": "mx",
            "app.kubernetes.io/managed-by": "mailbridge-operator",
            "app.kubernetes.io/part-of": "mailbridge",
            "app.kubernetes.io/component": "bridge",
        }.items() <= labels.items()
        assert "mail" == manifest["metadata"]["namespace"]


def test_config_map_holds_routes_with_secret_files_and_no_secret_values() -> None:
    manifests = render.render("mx", "mail", SPECS["many routes with rotation"], {"hooks": "1"})
    data = yaml.safe_load(manifests[0]["data"][render.CONFIG_KEY])
    assert 12 == len(data["routes"])
    assert {
        "url": "https://hooks.example/3",
        "secrets": [],
        "secret_files": ["/etc/mailbridge/secrets/r3/0", "/etc/mailbridge/secrets/r3/1"],
        "timeout_seconds": 3.0,
        "headers": {"X-Route": "3"},
    } == data["routes"][3]["webhook"]
    assert ("0.0.0.0", 2525, "mx.mail.svc") == (
        data["smtp"]["host"],
        data["smtp"]["port"],
        data["smtp"]["hostname"],
    )
    assert ("0.0.0.0", 8080, "json") == (
        data["http"]["host"],
        data["http"]["port"],
        data["log"]["format"],
    )


def test_signing_secrets_are_projected_at_the_files_the_config_names() -> None:
    manifests = by_kind(render.render("mx", "mail", SPECS["many routes with rotation"], {}))
    pod = manifests["Deployment/mx"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "webhook-secrets")
    items = {
        (source["secret"]["name"], item["key"], item["path"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert ("hooks", "r3", "r3/0") in items
    assert ("old-hooks", "r3", "r3/1") in items
    assert 24 == len(items)
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert (render.SECRETS_DIR, True) == (
        mounts["webhook-secrets"]["mountPath"],
        mounts["webhook-secrets"]["readOnly"],
    )


def test_pods_are_locked_down() -> None:
    pod = by_kind(render.render("mx", "mail", spec(), {}))["Deployment/mx"]["spec"]["template"]
    pod_spec = pod["spec"]
    assert {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    } == pod_spec["securityContext"]
    container = pod_spec["containers"][0]
    assert {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    } == container["securityContext"]
    assert False is pod_spec["automountServiceAccountToken"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert "/healthz" == container["livenessProbe"]["httpGet"]["path"]
    assert "/readyz" == container["readinessProbe"]["httpGet"]["path"]
    assert ["mailbridge"] == container["command"]
    assert {"name": "MAILBRIDGE_CONFIG", "value": "/etc/mailbridge/config/mailbridge.yaml"} == (
        container["env"][0]
    )
    assert 40 == pod_spec["terminationGracePeriodSeconds"]


def test_persistence_makes_a_statefulset_with_a_spool_claim() -> None:
    manifests = by_kind(render.render("mx", "mail", SPECS["persistent spool"], {}))
    assert "Deployment/mx" not in manifests
    sts = manifests["StatefulSet/mx"]["spec"]
    assert "mx-headless" == sts["serviceName"]
    claim = sts["volumeClaimTemplates"][0]
    assert ("spool", ["ReadWriteOncePod"], "5Gi", "fast") == (
        claim["metadata"]["name"],
        claim["spec"]["accessModes"],
        claim["spec"]["resources"]["requests"]["storage"],
        claim["spec"]["storageClassName"],
    )
    mounts = sts["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "spool", "mountPath": "/var/spool/mailbridge"} in mounts
    assert {"whenDeleted": "Retain", "whenScaled": "Retain"} == (
        sts["persistentVolumeClaimRetentionPolicy"]
    )
    data = yaml.safe_load(manifests["ConfigMap/mx-config"]["data"][render.CONFIG_KEY])
    assert "spool" == data["delivery"]["mode"]
    assert {
        "directory": "/var/spool/mailbridge",
        "max_bytes": int(5 * 2**30 * 0.9),
        "max_messages": 100000,
        "max_age_seconds": 432000.0,
        "delivery_workers": 32,
        "shutdown_grace_seconds": 10.0,
        "fsync": True,
    }.items() <= data["spool"].items()
    assert 50 == sts["template"]["spec"]["terminationGracePeriodSeconds"]  # 30 + 10 + 10


def test_spool_limits_come_from_the_spec() -> None:
    limited = spec(
        delivery={
            "mode": "spool",
            "spool": {
                "maxSize": "2Gi",
                "maxMessages": 500,
                "maxAge": "24h",
                "workers": 4,
                "shutdownGracePeriod": "1m",
            },
        },
        persistence={"enabled": True, "size": "10Gi"},
    )
    data = yaml.safe_load(render.config_yaml("mx", "mail", model.parse(limited)))
    assert (2 * 2**30, 500, 86400.0, 4, 60.0) == (
        data["spool"]["max_bytes"],
        data["spool"]["max_messages"],
        data["spool"]["max_age_seconds"],
        data["spool"]["delivery_workers"],
        data["spool"]["shutdown_grace_seconds"],
    )


def test_a_volume_too_small_for_a_spool_is_reported() -> None:
    tiny = spec(delivery={"mode": "spool"}, persistence={"enabled": True, "size": "1Mi"})
    with pytest.raises(model.InvalidSpecError, match=r"persistence\.size"):
        render.render("mx", "mail", tiny, {})


def test_service_maps_the_public_port_to_the_smtp_port() -> None:
    manifests = by_kind(render.render("mx", "mail", SPECS["load balancer"], {}))
    service = manifests["Service/mx"]
    assert {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"} == (
        service["metadata"]["annotations"]
    )
    assert {
        "type": "LoadBalancer",
        "externalTrafficPolicy": "Local",
        "loadBalancerSourceRanges": ["203.0.113.0/24"],
        "ports": [
            {
                "name": "smtp",
                "port": 2525,
                "targetPort": "smtp",
                "protocol": "TCP",
                "nodePort": 30025,
            }
        ],
        "selector": render.selector_labels("mx"),
    } == service["spec"]
    data = yaml.safe_load(manifests["ConfigMap/mx-config"]["data"][render.CONFIG_KEY])
    assert (True, ["10.0.0.0/8"], 2.0) == (
        data["smtp"]["proxy_protocol"],
        data["smtp"]["trusted_proxies"],
        data["smtp"]["proxy_timeout_seconds"],
    )


def test_service_monitor_selects_the_metrics_port() -> None:
    manifests = by_kind(render.render("mx", "mail", SPECS["monitoring and pdb"], {}))
    monitor = manifests["ServiceMonitor/mx"]
    headless = manifests["Service/mx-headless"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= headless["metadata"]["labels"].items()
    assert not selector.items() <= manifests["Service/mx"]["metadata"]["labels"].items()
    assert [{"port": "http", "path": "/metrics", "interval": "15s"}] == monitor["spec"]["endpoints"]
    assert "http" in [port["name"] for port in headless["spec"]["ports"]]
    assert "prom" == monitor["metadata"]["labels"]["release"]
    assert {"apiVersion", "kind", "metadata", "spec"} == set(monitor)
    assert {"minAvailable": "50%"} == {
        k: v for k, v in manifests["PodDisruptionBudget/mx"]["spec"].items() if k != "selector"
    }


@pytest.mark.parametrize("name", ["inbound", "mx", "mailbridge-inbound", "a" + "-b" * 25 + "c"])
def test_every_bridges_job_is_named_mailbridge_after_it(name: str) -> None:
    """Prometheus names the targets' job after the Service label the ServiceMonitor names."""
    with_monitor = spec(monitoring={"serviceMonitor": {"enabled": True}})
    manifests = by_kind(render.render(name, "mail", with_monitor, {}))
    monitor = manifests[f"ServiceMonitor/{name}"]
    assert render.JOB_LABEL == monitor["spec"]["jobLabel"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    (scraped,) = [
        service
        for key, service in manifests.items()
        if key.startswith("Service/") and selector.items() <= service["metadata"]["labels"].items()
    ]
    job = scraped["metadata"]["labels"][render.JOB_LABEL]
    assert f"mailbridge-{name}" == job == render.job_name(name)
    assert job == manifests[f"Service/{name}"]["metadata"]["labels"][render.JOB_LABEL]
    assert len(job) <= 63  # a label value; names are at most 52 characters


def test_pdb_defaults_to_one_unavailable() -> None:
    pdb = spec(podDisruptionBudget={"enabled": True})
    manifests = by_kind(render.render("mx", "mail", pdb, {}))
    assert 1 == manifests["PodDisruptionBudget/mx"]["spec"]["maxUnavailable"]


def _hash(manifests: list[dict[str, Any]]) -> str:
    workload = next(m for m in manifests if m["kind"] in ("Deployment", "StatefulSet"))
    return str(workload["spec"]["template"]["metadata"]["annotations"][render.HASH_ANNOTATION])


def test_config_hash_follows_config_and_secret_versions_only() -> None:
    base = _hash(render.render("mx", "mail", spec(), {"hooks": "7"}))
    assert base == _hash(render.render("mx", "mail", spec(), {"hooks": "7"}))
    assert base == _hash(render.render("mx", "mail", spec(), {"hooks": "7", "unrelated": "1"}))
    assert base != _hash(render.render("mx", "mail", spec(), {"hooks": "8"}))
    assert base != _hash(render.render("mx", "mail", spec(), {}))  # the Secret is missing
    changed = spec()
    changed["routes"][0]["recipients"].append("ops@example.org")
    assert base != _hash(render.render("mx", "mail", changed, {"hooks": "7"}))
    scaled = spec(replicas=5)  # not part of the pods' configuration
    assert base == _hash(render.render("mx", "mail", scaled, {"hooks": "7"}))


def test_the_operators_environment_never_leaks_into_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    baseline = render.config_yaml("mx", "mail", model.parse(spec()))
    monkeypatch.setenv("MAILBRIDGE_SMTP__PORT", "9999")
    monkeypatch.setenv("MAILBRIDGE_WEBHOOK_URL", "https://evil.example/")
    monkeypatch.setenv("MAILBRIDGE_TARGET_EMAILS", "a@b.c")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MAILBRIDGE_LOG__LEVEL=DEBUG\n")
    assert baseline == render.config_yaml("mx", "mail", model.parse(spec()))


def test_render_is_pure_and_accepts_a_parsed_spec() -> None:
    raw = spec()
    frozen = copy.deepcopy(raw)
    first = render.render("mx", "mail", raw, {"hooks": "1"})
    assert frozen == raw
    assert first == render.render("mx", "mail", model.parse(raw), {"hooks": "1"})


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (
            lambda s: s["routes"][0].update(recipients=["not an address"]),
            "spec.routes[0].recipients",
        ),
        (lambda s: s["routes"][0].update(recipients=["*@"]), "spec.routes[0].recipients"),
        (
            lambda s: s["service"].update(proxyProtocol={"trustedCIDRs": ["10.0.0.300/8"]}),
            "spec.service.proxyProtocol.trustedCIDRs",
        ),
    ],
)
def test_settings_the_bridge_refuses_are_reported_in_spec_terms(edit: Any, path: str) -> None:
    bad = spec(service={})
    edit(bad)
    with pytest.raises(model.InvalidSpecError) as caught:
        render.render("mx", "mail", bad, {})
    assert any(problem.startswith(path) for problem in caught.value.problems), caught.value


def test_image_tag_becomes_the_version_label() -> None:
    manifests = render.render("mx", "mail", spec(image="ghcr.io/x/mailbridge:1.2.3"), {})
    assert "1.2.3" == manifests[0]["metadata"]["labels"]["app.kubernetes.io/version"]
    digest_only = render.render("mx", "mail", SPECS["scheduling and extras"], {})
    assert "app.kubernetes.io/version" not in digest_only[0]["metadata"]["labels"]


def test_a_spec_without_an_image_runs_the_image_the_operator_was_given() -> None:
    mirrored = "registry.example/mirror/mailbridge:9.9.9"
    for manifests, image, version in (
        (render.render("mx", "mail", spec(), {}), model.DEFAULT_IMAGE, None),
        (render.render("mx", "mail", spec(), {}, default_image=mirrored), mirrored, "9.9.9"),
        (
            render.render(
                "mx", "mail", spec(image="ghcr.io/x/mb:1.2.3"), {}, default_image=mirrored
            ),
            "ghcr.io/x/mb:1.2.3",
            "1.2.3",
        ),
    ):
        children = by_kind(manifests)
        pod = children["Deployment/mx"]["spec"]["template"]
        assert image == pod["spec"]["containers"][0]["image"]
        expected = version or model.DEFAULT_IMAGE.rpartition(":")[2]
        assert expected == pod["metadata"]["labels"]["app.kubernetes.io/version"]
        assert expected == children["Service/mx"]["metadata"]["labels"]["app.kubernetes.io/version"]
