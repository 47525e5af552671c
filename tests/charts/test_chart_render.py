"""The chart rendered (``helm template``) for each scenario of tests/charts/values, checked by
the tools that know the APIs.

What this protects: every built-in object is valid for Kubernetes 1.29 and 1.35
(``kubernetes-validate --strict``: unknown fields are errors); the
PrometheusRule and the ServiceMonitors of bridges from values are valid for
prometheus-operator's own models, and the rules' MailbridgeDown fires (real
``promtool``) for the job of a bridge of any name; MailBridges from values pass the CRD's schema
and CEL rules and the operator's renderer; the RBAC is exactly what the
operator declares it uses; the operator's pod is locked down, probed on kopf's
liveness endpoint and never selected by a bridge's Service; monitoring objects
appear only when the cluster serves their API (or a value forces them).
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
from collections.abc import Iterable
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_tools import CHART, EXAMPLE_PATH, SCENARIOS, VALUES_DIR, Helm, of_kind, one
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from crdschema import CrdSchema

from mailbridge_operator import cli, model, rbac, render
from tests.conftest import require_tool

Manifest = dict[str, Any]
CUSTOM_KINDS = {"MailBridge", "PrometheusRule", "ServiceMonitor"}
KUBERNETES_VERSIONS = ("1.29.0", "1.35.0")
UID = render.UID  # the user of the operator's bridge pods, the image and the chart
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def triples(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """A ClusterRole's or Role's rules as (apiGroup, resource, verb) triples."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def declared(cluster_scoped: bool | None = None) -> set[tuple[str, str, str]]:
    return {
        (r.api_group, r.resource, verb)
        for r in rbac.RULES
        for verb in r.verbs
        if cluster_scoped in (None, r.cluster_scoped)
    }


def check_with_prometheus_operator(manifest: Manifest) -> None:
    """Validate with prometheus-operator's models; they drop unknown fields, so compare."""
    models = {
        "PrometheusRule": prometheus_operator.PrometheusRule,
        "ServiceMonitor": prometheus_operator.ServiceMonitor,
    }
    parsed = models[manifest["kind"]].model_validate(manifest)
    assert manifest == parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"), (
        f"{manifest['kind']} has fields prometheus-operator does not know"
    )


def bridge_children(crd: CrdSchema, bridge: Manifest) -> list[Manifest]:
    """What the operator renders for a MailBridge the chart installs (after API defaults)."""
    defaulted = crd.defaulted(bridge)
    spec = model.parse(defaulted["spec"])
    metadata = bridge["metadata"]
    return render.render(
        metadata["name"], metadata["namespace"], spec, {secret: "1" for secret in spec.secret_names}
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_builtin_object_is_valid_for_kubernetes(
    rendered: dict[str, list[Manifest]], scenario: str, version: str
) -> None:
    problems = []
    for manifest in rendered[scenario]:
        if manifest["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {error.message}")
    assert [] == problems


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_mailbridges_from_values_pass_the_crd_and_the_operators_renderer(
    rendered: dict[str, list[Manifest]], crd: CrdSchema, scenario: str
) -> None:
    bridges = of_kind(rendered[scenario], "MailBridge")
    values = (
        yaml.safe_load((VALUES_DIR / f"{scenario}.yaml").read_text())
        if scenario != "defaults"
        else {}
    )
    assert len(values.get("bridges", [])) == len(bridges)
    for bridge in bridges:
        assert [] == crd.validate(bridge)
        children = bridge_children(crd, bridge)
        for child in children:
            if child["kind"] == "ServiceMonitor":
                check_with_prometheus_operator(child)
            else:
                kubernetes_validate.validate(child, "1.35.0", strict=True)
    for bridge, given in zip(bridges, values.get("bridges", []), strict=True):
        assert given["spec"] == bridge["spec"]
        assert given.get("labels", {}).items() <= bridge["metadata"]["labels"].items()
        assert given.get("annotations") == bridge["metadata"].get("annotations")


def test_a_bridges_servicemonitor_from_values_is_valid_and_alerted_on(
    rendered: dict[str, list[Manifest]], crd: CrdSchema
) -> None:
    children = bridge_children(crd, one(rendered["monitoring"], "MailBridge"))
    monitor = one(children, "ServiceMonitor")
    check_with_prometheus_operator(monitor)
    assert "kube-prometheus-stack" == monitor["metadata"]["labels"]["release"]
    name = one(rendered["monitoring"], "MailBridge")["metadata"]["name"]
    job = job_of(monitor, of_kind(children, "Service"))
    assert (f"mailbridge-{name}", True) == (job, bridge_target(job))


def test_every_bridge_pages_when_down_whatever_its_name(
    crd: CrdSchema, tmp_path: pathlib.Path
) -> None:
    """The rules file's MailbridgeDown fires, under the real promtool, for the job of any
    bridge the operator renders (named with or without "mailbridge"), not for the operator."""
    example = next(
        doc
        for doc in yaml.safe_load_all(EXAMPLE_PATH.read_text())
        if doc and doc["kind"] == "MailBridge"
    )
    example["spec"]["monitoring"] = {"serviceMonitor": {"enabled": True}}
    names = ("inbound", "mx", "support-2", "mailbridge-inbound", "a" + "-b" * 25 + "c")
    jobs = []
    for name in names:
        bridge = {**example, "metadata": {"name": name, "namespace": "mail"}}
        children = bridge_children(crd, bridge)
        monitor = one(children, "ServiceMonitor")
        check_with_prometheus_operator(monitor)
        jobs.append(job_of(monitor, of_kind(children, "Service")))
    rules_path = CHART / "rules" / "mailbridge.rules.yaml"
    rules = yaml.safe_load(rules_path.read_text())
    (down,) = [
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "MailbridgeDown"
    ]
    series = [
        {
            "series": f'up{{namespace="mail", job="{job}", instance="10.0.0.{n}:8080"}}',
            "values": "0x6",
        }
        for n, job in enumerate([*jobs, "mailbridge-operator"], start=1)
    ]
    expected = []
    for job in jobs:
        labels = {"namespace": "mail", "job": job}
        expected.append(
            {
                "exp_labels": {**down["labels"], **labels},
                "exp_annotations": {
                    key: expand(text, labels) for key, text in down["annotations"].items()
                },
            }
        )
    unit = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "MailbridgeDown", "exp_alerts": expected}
                ],
            }
        ],
    }
    test_file = tmp_path / "bridge-jobs.test.yaml"
    test_file.write_text(yaml.safe_dump(unit, sort_keys=False))
    result = subprocess.run(
        [require_tool("promtool"), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr


def expand(template: str, labels: dict[str, str]) -> str:
    """An alert annotation as Prometheus fills it in, for the two forms the rules use."""
    text = template.replace(
        "{{ with $labels.namespace }}{{ . }}/{{ end }}", f"{labels['namespace']}/"
    )
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
    assert "{{" not in text, f"a template form expand() does not know: {text}"
    return text


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_prometheus_rule_embeds_the_rules_file_unchanged(
    rendered: dict[str, list[Manifest]], scenario: str
) -> None:
    rule = one(rendered[scenario], "PrometheusRule")
    check_with_prometheus_operator(rule)
    rules_file = yaml.safe_load((CHART / "rules" / "mailbridge.rules.yaml").read_text())
    assert rules_file == rule["spec"]
    assert "mb-mailbridge" == rule["metadata"]["name"]
    if scenario == "monitoring":
        assert "kube-prometheus-stack" == rule["metadata"]["labels"]["release"]


@pytest.mark.parametrize(
    ("kind", "key"), [("PrometheusRule", "prometheusRule"), ("ServiceMonitor", "serviceMonitor")]
)
@pytest.mark.parametrize(
    ("api", "settings", "expected"),
    [
        (False, (), False),
        (True, (), True),
        (False, ("force=true",), True),
        (True, ("enabled=false",), False),
        (False, ("enabled=false", "force=true"), False),
    ],
)
def test_monitoring_objects_need_their_api_or_force(
    helm: Helm, kind: str, key: str, api: bool, settings: tuple[str, ...], expected: bool
) -> None:
    args = ["--api-versions", f"monitoring.coreos.com/v1/{kind}"] if api else []
    for setting in settings:
        args += ["--set", f"{key}.{setting}"]
    assert expected == bool(of_kind(helm.template(*args), kind))


def job_of(monitor: Manifest, services: list[Manifest]) -> str:
    """The job name Prometheus gives a ServiceMonitor's targets (jobLabel, else the Service)."""
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    label = monitor["spec"].get("jobLabel")
    return str(service["metadata"]["labels"][label] if label else service["metadata"]["name"])


def bridge_target(job: str) -> bool:
    """Whether the rules file's availability alerts take this job for a bridge."""
    rules = (CHART / "rules" / "mailbridge.rules.yaml").read_text()
    assert 'job=~".*mailbridge.*", job!~".*operator.*"' in rules  # the selector read below
    return re.fullmatch(".*mailbridge.*", job) is not None and "operator" not in job


def test_the_operators_servicemonitor_scrapes_its_metrics_port_as_an_operator_job(
    rendered: dict[str, list[Manifest]],
) -> None:
    for scenario in SCENARIOS:
        manifests = rendered[scenario]
        monitor = one(manifests, "ServiceMonitor")
        check_with_prometheus_operator(monitor)
        job = job_of(monitor, of_kind(manifests, "Service"))
        assert "mailbridge-operator" == job
        assert not bridge_target(job), "the bridges' availability alerts would count the operator"
        assert "/metrics" == monitor["spec"]["endpoints"][0]["path"]
    monitor = one(rendered["monitoring"], "ServiceMonitor")
    assert "kube-prometheus-stack" == monitor["metadata"]["labels"]["release"]


def test_dashboards_are_configmaps_for_grafanas_sidecar(
    rendered: dict[str, list[Manifest]], helm: Helm
) -> None:
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files, "no dashboards in the chart"
    for scenario, namespace in (("defaults", "mail"), ("monitoring", "monitoring")):
        maps = of_kind(rendered[scenario], "ConfigMap")
        assert len(files) == len(maps)
        for path, config_map in zip(files, maps, strict=True):
            assert {path.name: path.read_text()} == config_map["data"]
            json.loads(config_map["data"][path.name])
            assert "1" == config_map["metadata"]["labels"]["grafana_dashboard"]
            assert namespace == config_map["metadata"]["namespace"]
    assert "Mail" == maps[0]["metadata"]["annotations"]["grafana_folder"]
    assert [] == of_kind(helm.template("--set", "dashboards.enabled=false"), "ConfigMap")


def test_watching_all_namespaces_grants_exactly_the_declared_rules_cluster_wide(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["defaults"]
    role = one(manifests, "ClusterRole")
    assert rbac.policy_rules() == role["rules"]
    assert declared() == triples(role["rules"])
    assert [] == of_kind(manifests, "Role") + of_kind(manifests, "RoleBinding")
    binding = one(manifests, "ClusterRoleBinding")
    account = one(manifests, "ServiceAccount")
    assert role["metadata"]["name"] == binding["roleRef"]["name"]
    assert [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "mail"}
    ] == binding["subjects"]
    deployment = one(manifests, "Deployment")
    assert (
        account["metadata"]["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    )


def test_watching_some_namespaces_grants_namespaced_rules_only_there(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["namespaced"]
    cluster_role = one(manifests, "ClusterRole")
    assert declared(cluster_scoped=True) == triples(cluster_role["rules"])
    roles = of_kind(manifests, "Role")
    bindings = of_kind(manifests, "RoleBinding")
    assert ["team-a", "team-b"] == [r["metadata"]["namespace"] for r in roles]
    assert ["team-a", "team-b"] == [b["metadata"]["namespace"] for b in bindings]
    for role, binding in zip(roles, bindings, strict=True):
        assert declared(cluster_scoped=False) == triples(role["rules"])
        assert ("Role", role["metadata"]["name"]) == (
            binding["roleRef"]["kind"],
            binding["roleRef"]["name"],
        )
        assert "mail" == binding["subjects"][0]["namespace"]
    args = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ["--namespace=team-a", "--namespace=team-b"] == [
        a for a in args if a.startswith("--namespace")
    ]
    assert "--all-namespaces" not in args


def test_rbac_can_be_left_to_the_user(helm: Helm) -> None:
    kinds = {m["kind"] for m in helm.template("--set", "rbac.create=false")}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    manifests = helm.template(
        "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=existing"
    )
    assert [] == of_kind(manifests, "ServiceAccount")
    assert "existing" == one(manifests, "ClusterRoleBinding")["subjects"][0]["name"]


def test_the_operator_runs_locked_down_with_probes_on_kopfs_liveness_endpoint(
    rendered: dict[str, list[Manifest]],
) -> None:
    deployment = one(rendered["defaults"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "Recreate" == deployment["spec"]["strategy"]["type"]  # never two kopf operators
    assert 1 == deployment["spec"]["replicas"]
    assert ["mailbridge-operator"] == container["command"]
    assert [
        "--all-namespaces",
        "--health-address=0.0.0.0:8081",
        "--metrics-address=0.0.0.0:8082",
        "--log-format=json",
    ] == container["args"]
    cli.build_parser().parse_args(container["args"])  # the operator accepts them
    assert "ghcr.io/mailbridge/mailbridge:0.1.0" == container["image"]
    assert "resources" not in container  # unset by default: the user measures and sets them
    assert {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    } == pod["securityContext"]
    assert {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    } == container["securityContext"]
    assert [
        {"name": "health", "containerPort": 8081, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8082, "protocol": "TCP"},
    ] == container["ports"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert {"path": "/healthz", "port": "health"} == container[probe]["httpGet"]
    assert [{"name": "tmp", "mountPath": "/tmp"}] == container["volumeMounts"]


def test_the_operators_pod_is_never_selected_by_a_bridge(
    rendered: dict[str, list[Manifest]], crd: CrdSchema
) -> None:
    """A MailBridge named like the release must not send its SMTP traffic to the operator."""
    for scenario in SCENARIOS:
        manifests = rendered[scenario]
        deployment = one(manifests, "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for name in ("mb", "mailbridge", "mb-mailbridge"):
            assert not render.selector_labels(name).items() <= labels.items()
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        assert selector == one(manifests, "Service")["spec"]["selector"]
    namespaced = rendered["namespaced"]
    assert (
        "mail"
        == one(namespaced, "Deployment")["spec"]["template"]["metadata"]["labels"][
            "example.com/team"
        ]
    )


def test_values_reach_the_operators_pod(rendered: dict[str, list[Manifest]]) -> None:
    pod = one(rendered["namespaced"], "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}} == (
        container["resources"]
    )
    assert {"kubernetes.io/os": "linux"} == pod["nodeSelector"]
    assert "dedicated" == pod["tolerations"][0]["key"]
    assert {"--log-format=plain", "--verbose"} <= set(container["args"])
    bridges = one(rendered["bridges"], "Deployment")["spec"]["template"]["spec"]
    assert ("ghcr.io/mailbridge/mailbridge@sha256:" + "0123456789abcdef" * 4) == (
        bridges["containers"][0]["image"]
    )
    assert [{"name": "registry-credentials"}] == bridges["imagePullSecrets"]


@pytest.mark.parametrize(
    ("settings", "image"),
    [
        ((), f"ghcr.io/mailbridge/mailbridge:{APP_VERSION}"),
        (
            ("image.repository=registry.example/mirror/mailbridge", "image.tag=9.9.9"),
            "registry.example/mirror/mailbridge:9.9.9",
        ),
        (
            ("image.digest=sha256:" + "ab" * 32, "image.tag=9.9.9"),
            "ghcr.io/mailbridge/mailbridge@sha256:" + "ab" * 32,
        ),
    ],
)
def test_the_operator_gives_its_bridges_the_charts_image(
    helm: Helm, settings: tuple[str, ...], image: str
) -> None:
    args = ["--set", "operator.extraEnv[0].name=HTTPS_PROXY"]
    args += ["--set", "operator.extraEnv[0].value=http://proxy.example:3128"]
    for setting in settings:
        args += ["--set", setting]
    (container,) = one(helm.template(*args), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert image == container["image"]
    assert [
        {"name": cli.BRIDGE_IMAGE_ENV, "value": image},
        {"name": "HTTPS_PROXY", "value": "http://proxy.example:3128"},
    ] == container["env"]
    assert image == cli.bridge_image({e["name"]: e["value"] for e in container["env"]})


def test_the_helm_test_pod_asks_the_operators_service(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["defaults"]
    pod = one(manifests, "Pod")
    service = one(manifests, "Service")
    assert "test" == pod["metadata"]["annotations"]["helm.sh/hook"]
    (container,) = pod["spec"]["containers"]
    assert ["python", "-c"] == container["command"][:2]
    assert "http://mb-mailbridge.mail.svc:8081/healthz" == container["command"][-1]
    assert ("mb-mailbridge", 8081, "health") == (
        service["metadata"]["name"],
        service["spec"]["ports"][0]["port"],
        service["spec"]["ports"][0]["targetPort"],
    )
    assert "Never" == pod["spec"]["restartPolicy"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert True is container["securityContext"]["readOnlyRootFilesystem"]
