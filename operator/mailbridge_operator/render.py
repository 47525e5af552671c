"""Render a MailBridge into the manifests of its children.

``render(name, namespace, spec, secret_versions)`` returns, in apply order:
the ConfigMap with the bridge's configuration, the SMTP Service, a headless
Service (the StatefulSet's governing Service and the metrics endpoint), a
Deployment — or a StatefulSet with a volume claim per pod when persistence is
on — and, when enabled, a ServiceMonitor and a PodDisruptionBudget.

The ConfigMap is the bridge's own settings model (``mailbridge.config.Settings``)
built from the spec and serialised with ``config.to_yaml``, so the operator and
the bridge can never disagree on a setting's name; the model is built from the
spec alone (never from the operator's environment or a ``.env`` file). Signing
secrets never enter the ConfigMap: their Secrets are mounted as files and
listed in ``webhook.secret_files``. The pod template carries
``mailbridge.io/config-hash`` over the rendered configuration and the
referenced Secrets' resourceVersions, so a change to either rolls the pods.
The bridges run ``spec.image``, else the image the operator was given
(``default_image``), else the operator's own version of the image.
Both Services carry ``mailbridge.io/job: mailbridge-<name>`` and the
ServiceMonitor names it as its ``jobLabel``, so every bridge's job matches the
alert rules' ``job=~".*mailbridge.*"`` whatever the MailBridge is called.

Pure: trusts a parsed spec (or parses a mapping), emits plain dicts, no I/O.
With persistence, each pod's volume claim is mounted at the bridge's spool
directory (``/var/spool/mailbridge``, also set explicitly in the configuration)
and the spool's size limit defaults to 90% of the claim.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from mailbridge import config
from mailbridge_operator import model

Manifest = dict[str, Any]

CONFIG_KEY = "mailbridge.yaml"
CONFIG_DIR = "/etc/mailbridge/config"
SECRETS_DIR = "/etc/mailbridge/secrets"
TLS_DIR = "/etc/mailbridge/tls"
SPOOL_DIR = config.DEFAULT_SPOOL_DIRECTORY  # the image's spool directory, the claim's mount
SPOOL_SHARE_OF_VOLUME = 0.9  # default spool limit: the volume must never fill up
HTTP_PORT = 8080
UID = 10001
FILE_MODE = 0o440  # readable by the pod's group (fsGroup), never world-readable
HASH_ANNOTATION = "mailbridge.io/config-hash"
MANAGER = "mailbridge-operator"
HEADLESS_LABEL = "mailbridge.io/service"
# The Services' label the ServiceMonitor names as its jobLabel: Prometheus calls the
# bridge's job "mailbridge-<name>", which the alert rules' job=~".*mailbridge.*" takes.
JOB_LABEL = "mailbridge.io/job"


# Where a problem in the bridge's settings comes from in the MailBridge spec.
_SETTINGS_TO_SPEC = {
    "smtp.hostname": "spec.smtp.hostname",
    "smtp.trusted_proxies": "spec.service.proxyProtocol.trustedCIDRs",
    "parsing.header_prefixes": "spec.parsing.headerPrefixes",
    "spool.max_bytes": "spec.delivery.spool.maxSize (or 90% of spec.persistence.size)",
}
_ROUTE_FIELDS = {"name": "name", "recipients": "recipients", "webhook": "webhook"}


def names(name: str) -> dict[str, str]:
    """The children's names (one place, used by render, status and the handlers)."""
    return {
        "config": f"{name}-config",
        "service": name,
        "headless": f"{name}-headless",
        "workload": name,
        "service_monitor": name,
        "pdb": name,
    }


def job_name(name: str) -> str:
    """The Prometheus job of a bridge's targets: always contains "mailbridge" (63 chars at most)."""
    return f"mailbridge-{name}"


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "mailbridge", "app.kubernetes.io/instance": name}


def labels(name: str, spec: model.MailBridgeSpec) -> dict[str, str]:
    """Kubernetes recommended labels for every child."""
    result = selector_labels(name) | {
        "app.kubernetes.io/component": "bridge",
        "app.kubernetes.io/part-of": "mailbridge",
        "app.kubernetes.io/managed-by": MANAGER,
    }
    version = _image_tag(spec.effective_image)
    if version:
        result["app.kubernetes.io/version"] = version
    return result


def bridge_settings(name: str, namespace: str, spec: model.MailBridgeSpec) -> config.Settings:
    """The bridge's own settings model for these pods; :class:`InvalidSpecError` if refused."""
    smtp, service, delivery = spec.smtp, spec.service, spec.delivery
    values: dict[str, Any] = {
        "smtp": {
            "host": "0.0.0.0",
            "port": smtp.port,
            "hostname": smtp.hostname or f"{name}.{namespace}.svc",
            "max_message_size_bytes": smtp.max_message_size,
            "max_recipients": smtp.max_recipients,
            "max_sessions": smtp.max_sessions,
            "max_sessions_per_ip": smtp.max_sessions_per_ip,
            "max_unknown_recipients": smtp.max_unknown_recipients,
            "command_timeout_seconds": smtp.command_timeout,
            "data_timeout_seconds": smtp.data_timeout,
            "require_tls": smtp.require_tls,
            "proxy_protocol": service.proxy_protocol.enabled,
            "proxy_timeout_seconds": service.proxy_protocol.timeout,
            "shutdown_grace_seconds": smtp.shutdown_grace_period,
        },
        "tls": {
            "enabled": spec.tls.enabled,
            "min_version": spec.tls.min_version,
        },
        "delivery": {
            "mode": delivery.mode,
            "sync_attempts": delivery.sync.attempts,
            "sync_budget_seconds": delivery.sync.budget,
            "retry_initial_seconds": delivery.retry.initial_delay,
            "retry_max_seconds": delivery.retry.max_delay,
            "permanent_statuses": delivery.retry.permanent_statuses,
            "breaker_failure_threshold": delivery.breaker.failure_threshold,
            "breaker_open_seconds": delivery.breaker.open_duration,
            "max_connections": delivery.max_connections,
        },
        "spool": {
            "directory": SPOOL_DIR,
            "max_bytes": delivery.spool.max_size
            or int(model.parse_size(spec.persistence.size) * SPOOL_SHARE_OF_VOLUME),
            "max_messages": delivery.spool.max_messages,
            "max_age_seconds": delivery.spool.max_age,
            "delivery_workers": delivery.spool.workers,
            "shutdown_grace_seconds": delivery.spool.shutdown_grace_period,
        },
        "parsing": {
            "header_prefixes": spec.parsing.header_prefixes,
            "max_inline_attachment_bytes": spec.parsing.max_inline_attachment_size,
        },
        "http": {"host": "0.0.0.0", "port": HTTP_PORT},
        "log": {"level": spec.log_level.upper(), "format": "json"},
        "routes": [
            {
                "name": route.name,
                "recipients": route.recipients,
                "webhook": {
                    "url": route.webhook.url,
                    "secret_files": [
                        f"{SECRETS_DIR}/{_secret_path(route.name, index)}"
                        for index, _ in enumerate(route.webhook.secret_refs)
                    ],
                    "timeout_seconds": route.webhook.timeout,
                    "headers": route.webhook.headers,
                },
            }
            for route in spec.routes
        ],
    }
    if service.proxy_protocol.trusted_cidrs is not None:
        values["smtp"]["trusted_proxies"] = service.proxy_protocol.trusted_cidrs
    if spec.tls.enabled and spec.tls.secret_name:
        values["tls"] |= {"cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key"}
    try:
        return config.from_mapping(values)
    except ValidationError as error:
        raise model.InvalidSpecError(_settings_problems(error)) from None


def config_yaml(name: str, namespace: str, spec: model.MailBridgeSpec) -> str:
    """The file the bridge reads through ``MAILBRIDGE_CONFIG``."""
    return config.to_yaml(bridge_settings(name, namespace, spec))


def config_hash(config_text: str, secret_versions: Mapping[str, str | None]) -> str:
    """sha256 over the configuration and each referenced Secret's resourceVersion."""
    document = json.dumps(
        {"config": config_text, "secrets": sorted(secret_versions.items())},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(document.encode()).hexdigest()


def render(
    name: str,
    namespace: str,
    spec: model.MailBridgeSpec | Mapping[str, Any],
    secret_versions: Mapping[str, str | None],
    *,
    default_image: str = model.DEFAULT_IMAGE,
) -> list[Manifest]:
    """Every child of the MailBridge, in apply order; :class:`InvalidSpecError` if impossible.

    ``secret_versions`` maps each name of :attr:`MailBridgeSpec.secret_names` to its
    resourceVersion (``None`` while the Secret does not exist). ``default_image`` is
    the bridges' image when the spec sets none (the operator's
    ``MAILBRIDGE_OPERATOR_BRIDGE_IMAGE``); it also gives the version label.
    """
    model.check_name(name)
    parsed = spec if isinstance(spec, model.MailBridgeSpec) else model.parse(spec)
    if parsed.image is None:
        parsed = parsed.model_copy(update={"image": default_image})
    text = config_yaml(name, namespace, parsed)
    versions = {secret: secret_versions.get(secret) for secret in parsed.secret_names}
    digest = config_hash(text, versions)
    manifests = [
        _config_map(name, namespace, parsed, text),
        _service(name, namespace, parsed),
        _headless_service(name, namespace, parsed),
        _workload(name, namespace, parsed, digest),
    ]
    if parsed.monitoring.service_monitor.enabled:
        manifests.append(_service_monitor(name, namespace, parsed))
    if parsed.pod_disruption_budget.enabled:
        manifests.append(_pod_disruption_budget(name, namespace, parsed))
    return manifests


def workload_kind(spec: model.MailBridgeSpec) -> str:
    return "StatefulSet" if spec.persistence.enabled else "Deployment"


def _metadata(name: str, child: str, namespace: str, spec: model.MailBridgeSpec) -> dict[str, Any]:
    return {"name": child, "namespace": namespace, "labels": labels(name, spec)}


def _config_map(name: str, namespace: str, spec: model.MailBridgeSpec, text: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, names(name)["config"], namespace, spec),
        "data": {CONFIG_KEY: text},
    }


def _service(name: str, namespace: str, spec: model.MailBridgeSpec) -> Manifest:
    service = spec.service
    port: dict[str, Any] = {
        "name": "smtp",
        "port": service.port,
        "targetPort": "smtp",
        "protocol": "TCP",
    }
    if service.node_port is not None:
        port["nodePort"] = service.node_port
    body: dict[str, Any] = {
        "type": service.type,
        "selector": selector_labels(name),
        "ports": [port],
    }
    if service.external_traffic_policy is not None:
        body["externalTrafficPolicy"] = service.external_traffic_policy
    if service.load_balancer_source_ranges is not None:
        body["loadBalancerSourceRanges"] = service.load_balancer_source_ranges
    metadata = _metadata(name, names(name)["service"], namespace, spec)
    metadata["labels"] = metadata["labels"] | {JOB_LABEL: job_name(name)}
    if service.annotations:
        metadata["annotations"] = dict(service.annotations)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": body}


def _headless_service(name: str, namespace: str, spec: model.MailBridgeSpec) -> Manifest:
    metadata = _metadata(name, names(name)["headless"], namespace, spec)
    metadata["labels"] = metadata["labels"] | {
        HEADLESS_LABEL: "headless",
        JOB_LABEL: job_name(name),
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name),
            "ports": [
                {"name": "smtp", "port": spec.smtp.port, "targetPort": "smtp", "protocol": "TCP"},
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }


def _workload(name: str, namespace: str, spec: model.MailBridgeSpec, digest: str) -> Manifest:
    template = _pod_template(name, spec, digest)
    metadata = _metadata(name, names(name)["workload"], namespace, spec)
    selector = {"matchLabels": selector_labels(name)}
    if not spec.persistence.enabled:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {
                "replicas": spec.replicas,
                "selector": selector,
                "revisionHistoryLimit": 5,
                # Keep SMTP capacity during a rollout: add a pod before removing one.
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
                },
                "template": template,
            },
        }
    persistence = spec.persistence
    claim_spec: dict[str, Any] = {
        "accessModes": list(persistence.access_modes),
        "resources": {"requests": {"storage": persistence.size}},
    }
    if persistence.storage_class_name:
        claim_spec["storageClassName"] = persistence.storage_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata,
        "spec": {
            "replicas": spec.replicas,
            "selector": selector,
            "serviceName": names(name)["headless"],
            "podManagementPolicy": "Parallel",
            "revisionHistoryLimit": 5,
            "updateStrategy": {"type": "RollingUpdate"},
            # Spooled mail lives on the claims: never delete them with the pods.
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Retain",
                "whenScaled": "Retain",
            },
            "template": template,
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "spool", "labels": selector_labels(name)},
                    "spec": claim_spec,
                }
            ],
        },
    }


def _pod_template(name: str, spec: model.MailBridgeSpec, digest: str) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": names(name)["config"],
                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
                "defaultMode": FILE_MODE,
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    sources = _secret_sources(spec)
    if sources:
        volumes.append(
            {"name": "webhook-secrets", "projected": {"sources": sources, "defaultMode": FILE_MODE}}
        )
        mounts.append({"name": "webhook-secrets", "mountPath": SECRETS_DIR, "readOnly": True})
    if spec.tls.enabled and spec.tls.secret_name:
        volumes.append(
            {
                "name": "tls",
                "secret": {
                    "secretName": spec.tls.secret_name,
                    "items": [
                        {"key": "tls.crt", "path": "tls.crt"},
                        {"key": "tls.key", "path": "tls.key"},
                    ],
                    "defaultMode": FILE_MODE,
                },
            }
        )
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if spec.persistence.enabled:
        mounts.append({"name": "spool", "mountPath": SPOOL_DIR})

    container: dict[str, Any] = {
        "name": "mailbridge",
        "image": spec.effective_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["mailbridge"],
        "env": [{"name": "MAILBRIDGE_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"}, *spec.env],
        "ports": [
            {"name": "smtp", "containerPort": spec.smtp.port, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
        ],
        "startupProbe": _probe("/healthz", period=2, failures=30),
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "readinessProbe": _probe("/readyz", period=5, failures=2),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    resources = {
        key: dict(value)
        for key, value in (("requests", spec.resources.requests), ("limits", spec.resources.limits))
        if value
    }
    if resources:
        container["resources"] = resources

    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the bridge never talks to the API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": _grace_seconds(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in spec.image_pull_secrets]
    scheduling = spec.scheduling
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod["tolerations"] = list(scheduling.tolerations)
    if scheduling.affinity:
        pod["affinity"] = dict(scheduling.affinity)
    if scheduling.topology_spread_constraints:
        pod["topologySpreadConstraints"] = list(scheduling.topology_spread_constraints)
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name

    return {
        "metadata": {
            "labels": dict(spec.pod_labels) | labels(name, spec),
            "annotations": dict(spec.pod_annotations) | {HASH_ANNOTATION: digest},
        },
        "spec": pod,
    }


def _grace_seconds(spec: model.MailBridgeSpec) -> int:
    """SMTP sessions finish, then (spool mode) deliveries in flight, plus a margin."""
    grace = spec.smtp.shutdown_grace_period
    if spec.delivery.mode == "spool":
        grace += spec.delivery.spool.shutdown_grace_period
    return math.ceil(grace) + 10


def _secret_sources(spec: model.MailBridgeSpec) -> list[dict[str, Any]]:
    """Projected-volume sources: each signing secret at ``<route>/<index>``."""
    items: dict[str, list[dict[str, str]]] = {}
    for route in spec.routes:
        for index, ref in enumerate(route.webhook.secret_refs):
            items.setdefault(ref.name, []).append(
                {"key": ref.key, "path": _secret_path(route.name, index)}
            )
    return [{"secret": {"name": secret, "items": entries}} for secret, entries in items.items()]


def _secret_path(route: str, index: int) -> str:
    return f"{route}/{index}"


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _service_monitor(name: str, namespace: str, spec: model.MailBridgeSpec) -> Manifest:
    monitor = spec.monitoring.service_monitor
    metadata = _metadata(name, names(name)["service_monitor"], namespace, spec)
    metadata["labels"] = dict(monitor.labels) | metadata["labels"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata,
        "spec": {
            "jobLabel": JOB_LABEL,
            "selector": {"matchLabels": selector_labels(name) | {HEADLESS_LABEL: "headless"}},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": monitor.interval}],
        },
    }


def _pod_disruption_budget(name: str, namespace: str, spec: model.MailBridgeSpec) -> Manifest:
    budget = spec.pod_disruption_budget
    body: dict[str, Any] = {"selector": {"matchLabels": selector_labels(name)}}
    if budget.min_available is not None:
        body["minAvailable"] = budget.min_available
    else:
        body["maxUnavailable"] = budget.max_unavailable if budget.max_unavailable is not None else 1
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(name, names(name)["pdb"], namespace, spec),
        "spec": body,
    }


def _image_tag(image: str) -> str | None:
    reference = image.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    tag = last.rsplit(":", 1)[1][:63].strip("-_.")
    return tag or None


def _settings_problems(error: ValidationError) -> list[str]:
    problems = []
    for problem in error.errors():
        location = tuple(problem["loc"])
        path = _spec_path(location)
        message = problem["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {message}")
    return problems


def _spec_path(location: tuple[int | str, ...]) -> str:
    """Translate a location in the bridge's settings into the spec's terms."""
    if len(location) >= 3 and location[0] == "routes" and isinstance(location[1], int):
        field = _ROUTE_FIELDS.get(str(location[2]))
        if field is not None:
            rest = tuple(to_camel(str(p)) if isinstance(p, str) else p for p in location[3:])
            return model.format_path(f"spec.routes[{location[1]}].{field}", rest)
    for prefix, spec_path in _SETTINGS_TO_SPEC.items():
        parts = tuple(prefix.split("."))
        if location[: len(parts)] == parts:
            return model.format_path(spec_path, location[len(parts) :])
    return model.format_path("spec (bridge setting)", location)
