"""A MailBridge's spec as a typed, validated model.

Trusts nothing: the API server validates against the CRD's schema and CEL rules,
but the operator may read objects written before a rule existed, or a cluster
may run without the CRD's validation. Every constraint the operator relies on
is checked again here, and :func:`parse` raises :class:`InvalidSpecError`
listing *every* problem with its path in the spec (``spec.routes[0].webhook.url``).

Defaults repeat the CRD's ``default:`` values (the CRD is the source of truth;
``tests/operator/test_crd.py`` fails when the two disagree). Durations use the
Gateway API form (``1h``, ``5m``, ``30s``, ``500ms``) and become seconds; sizes
are Kubernetes quantities (``25Mi``) and become bytes.

Pure: no I/O, reads no settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import metadata
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "mailbridge.io"
VERSION = "v1alpha1"
PLURAL = "mailbridges"
KIND = "MailBridge"
API_VERSION = f"{GROUP}/{VERSION}"

MAX_NAME_LENGTH = 52  # StatefulSet pods and "<name>-headless" must stay valid DNS labels
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ROUTE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
SECRET_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
DURATION_RE = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
DURATION_PART_RE = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
SIZE_RE = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
PERCENT_OR_INT_RE = re.compile(r"^[0-9]+%?$")
URL_RE = re.compile(r"^https?://[^\s/?#]+([/?#]\S*)?$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&*+.^_`|~-]{1,256}$")
RESERVED_HEADER_RE = re.compile(
    r"^(webhook-.*|content-type|content-length|host|traceparent|tracestate)$", re.IGNORECASE
)
SIZE_FACTORS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
DURATION_FACTORS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _default_image() -> str:
    try:
        version = metadata.version("mailbridge")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        version = "latest"
    return f"ghcr.io/mailbridge/mailbridge:{version}"


DEFAULT_IMAGE = _default_image()


class InvalidSpecError(ValueError):
    """The spec cannot be rendered; ``problems`` holds one line per problem, with its path."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def parse_duration(value: Any) -> Any:
    """``"1m30s"`` → ``90.0`` seconds; numbers pass through (already seconds)."""
    if isinstance(value, str):
        if not DURATION_RE.match(value):
            raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 1h or 500ms")
        return sum(
            int(amount) * DURATION_FACTORS[unit] for amount, unit in DURATION_PART_RE.findall(value)
        )
    return value


def parse_size(value: Any) -> Any:
    """``"25Mi"`` → ``26214400`` bytes; integers pass through."""
    if isinstance(value, str):
        match = SIZE_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size such as 512Ki, 25Mi or 1G")
        return int(match.group(1)) * SIZE_FACTORS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Bytes = Annotated[int, BeforeValidator(parse_size)]
IntOrPercent = int | Annotated[str, Field(pattern=PERCENT_OR_INT_RE.pattern)]
Quantity = int | str


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class SecretKeyRef(_Spec):
    """A key of a Secret in the MailBridge's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_RE.pattern)
    key: str = Field("secret", min_length=1, max_length=253, pattern=SECRET_KEY_RE.pattern)


class Webhook(_Spec):
    url: str = Field(min_length=8, max_length=2048, pattern=URL_RE.pattern)
    signing_secret_ref: SecretKeyRef | None = None
    additional_signing_secret_refs: list[SecretKeyRef] = Field(default_factory=list, max_length=4)
    timeout: Seconds = 10.0
    headers: dict[str, str] = Field(default_factory=dict, max_length=32)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value:
            if not HEADER_NAME_RE.match(header):
                raise ValueError(f"{header!r} is not an HTTP header name")
            if RESERVED_HEADER_RE.match(header):
                raise ValueError(f"{header!r} is set by the bridge and cannot be overridden")
        return value

    @model_validator(mode="after")
    def _rotation_needs_primary(self) -> Webhook:
        if self.additional_signing_secret_refs and self.signing_secret_ref is None:
            raise ValueError("additionalSigningSecretRefs needs signingSecretRef")
        return self

    @property
    def secret_refs(self) -> tuple[SecretKeyRef, ...]:
        """All signing secrets, the primary first."""
        primary = (self.signing_secret_ref,) if self.signing_secret_ref else ()
        return primary + tuple(self.additional_signing_secret_refs)


class Route(_Spec):
    name: str = Field(min_length=1, max_length=63, pattern=ROUTE_NAME_RE.pattern)
    recipients: list[str] = Field(min_length=1, max_length=1000)
    webhook: Webhook


class Smtp(_Spec):
    port: int = Field(2525, ge=1024, le=65535)
    hostname: str | None = Field(None, min_length=1, max_length=253)
    max_message_size: Bytes = Field(25 * 2**20, ge=1024)
    max_recipients: int = Field(100, ge=1, le=10000)
    max_sessions: int = Field(1000, ge=1, le=100000)
    max_sessions_per_ip: int = Field(20, ge=1, le=100000, alias="maxSessionsPerIP")
    max_unknown_recipients: int = Field(20, ge=1, le=10000)
    command_timeout: Seconds = 300.0
    data_timeout: Seconds = 600.0
    require_tls: bool = Field(False, alias="requireTLS")
    shutdown_grace_period: Seconds = 30.0


class Tls(_Spec):
    enabled: bool = True
    secret_name: str | None = Field(
        None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_RE.pattern
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _secret_needs_tls(self) -> Tls:
        if self.secret_name is not None and not self.enabled:
            raise ValueError("tls.secretName needs tls.enabled")
        return self


class Parsing(_Spec):
    header_prefixes: list[str] = Field(default_factory=list, max_length=32)
    max_inline_attachment_size: Bytes = Field(10 * 2**20, ge=0)


class SyncDelivery(_Spec):
    attempts: int = Field(3, ge=1, le=10)
    budget: Seconds = 60.0


class Retry(_Spec):
    initial_delay: Seconds = 0.5
    max_delay: Seconds = 600.0
    permanent_statuses: list[int] = Field(
        default_factory=lambda: [400, 410, 413, 415, 422], max_length=100
    )

    @field_validator("permanent_statuses")
    @classmethod
    def _client_errors(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 400 <= status <= 499 or status in (408, 429):
                raise ValueError(f"{status} cannot be permanent (only 4xx other than 408/429)")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Retry:
        if self.initial_delay > self.max_delay:
            raise ValueError("retry.initialDelay must not exceed retry.maxDelay")
        return self


class SpoolDelivery(_Spec):
    max_size: Bytes | None = Field(None, ge=2**20)
    max_messages: int = Field(100_000, ge=1, le=10_000_000)
    max_age: Seconds = 120 * 3600.0
    workers: int = Field(32, ge=1, le=10_000)
    shutdown_grace_period: Seconds = 10.0


class Breaker(_Spec):
    failure_threshold: int = Field(5, ge=1, le=1000)
    open_duration: Seconds = 30.0


class Delivery(_Spec):
    mode: Literal["sync", "spool"] = "sync"
    max_connections: int = Field(100, ge=1, le=10000)
    sync: SyncDelivery = Field(default_factory=SyncDelivery)
    retry: Retry = Field(default_factory=Retry)
    spool: SpoolDelivery = Field(default_factory=SpoolDelivery)
    breaker: Breaker = Field(default_factory=Breaker)


class Persistence(_Spec):
    enabled: bool = False
    size: Quantity = "1Gi"
    storage_class_name: str | None = Field(None, min_length=1, max_length=253)
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]] = Field(
        default_factory=lambda: ["ReadWriteOnce"], min_length=1, max_length=4
    )

    @field_validator("size")
    @classmethod
    def _size(cls, value: Quantity) -> Quantity:
        parse_size(value)
        return value


class ProxyProtocol(_Spec):
    enabled: bool = False
    trusted_cidrs: list[str] | None = Field(None, alias="trustedCIDRs", max_length=64)
    timeout: Seconds = 5.0


class Service(_Spec):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(25, ge=1, le=65535)
    node_port: int | None = Field(None, ge=1, le=65535)
    annotations: dict[str, str] = Field(default_factory=dict, max_length=64)
    external_traffic_policy: Literal["Cluster", "Local"] | None = None
    load_balancer_source_ranges: list[str] | None = Field(None, max_length=64)
    proxy_protocol: ProxyProtocol = Field(default_factory=ProxyProtocol)

    @model_validator(mode="after")
    def _type_specific(self) -> Service:
        if self.external_traffic_policy is not None and self.type == "ClusterIP":
            raise ValueError("externalTrafficPolicy needs type NodePort or LoadBalancer")
        if self.node_port is not None and self.type == "ClusterIP":
            raise ValueError("nodePort needs type NodePort or LoadBalancer")
        if self.load_balancer_source_ranges is not None and self.type != "LoadBalancer":
            raise ValueError("loadBalancerSourceRanges needs type LoadBalancer")
        return self


class ServiceMonitor(_Spec):
    enabled: bool = False
    interval: str = Field("30s", pattern=DURATION_RE.pattern)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)


class Monitoring(_Spec):
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor)


class PodDisruptionBudget(_Spec):
    enabled: bool = False
    min_available: IntOrPercent | None = None
    max_unavailable: IntOrPercent | None = None

    @model_validator(mode="after")
    def _one_of(self) -> PodDisruptionBudget:
        if self.min_available is not None and self.max_unavailable is not None:
            raise ValueError("set minAvailable or maxUnavailable, not both")
        return self


class Resources(_Spec):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class Scheduling(_Spec):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    priority_class_name: str | None = Field(None, max_length=253)


class LocalObjectReference(_Spec):
    name: str = Field(min_length=1, max_length=253)


def _default_resources() -> Resources:
    return Resources(requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"})


class MailBridgeSpec(_Spec):
    """The whole spec, defaults filled in."""

    replicas: int = Field(1, ge=0, le=100)
    image: str | None = Field(None, min_length=1, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    smtp: Smtp = Field(default_factory=Smtp)
    tls: Tls = Field(default_factory=Tls)
    routes: list[Route] = Field(min_length=1, max_length=100)
    parsing: Parsing = Field(default_factory=Parsing)
    delivery: Delivery = Field(default_factory=Delivery)
    persistence: Persistence = Field(default_factory=Persistence)
    service: Service = Field(default_factory=Service)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    pod_disruption_budget: PodDisruptionBudget = Field(default_factory=PodDisruptionBudget)
    resources: Resources = Field(default_factory=_default_resources)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    pod_annotations: dict[str, str] = Field(default_factory=dict, max_length=64)
    pod_labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    env: list[dict[str, Any]] = Field(default_factory=list, max_length=64)
    service_account_name: str | None = Field(None, min_length=1, max_length=253)

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, value: list[Route]) -> list[Route]:
        names = [route.name for route in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"route names must be unique, repeated: {', '.join(repeated)}")
        return value

    @field_validator("pod_annotations")
    @classmethod
    def _own_annotations(cls, value: dict[str, str]) -> dict[str, str]:
        if any(key.startswith("mailbridge.io/") for key in value):
            raise ValueError("the mailbridge.io/ annotation prefix is reserved for the operator")
        return value

    @field_validator("pod_labels")
    @classmethod
    def _own_labels(cls, value: dict[str, str]) -> dict[str, str]:
        if any(key.startswith("app.kubernetes.io/") for key in value):
            raise ValueError("the app.kubernetes.io/ labels are set by the operator")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for variable in value:
            name = variable.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("every env entry needs a name")
            if name.startswith("MAILBRIDGE_"):
                raise ValueError(f"{name}: MAILBRIDGE_* variables are reserved")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> MailBridgeSpec:
        if self.delivery.mode == "spool" and not self.persistence.enabled:
            raise ValueError(
                "delivery.mode spool keeps accepted mail on disk after answering 250: "
                "set persistence.enabled so the spool survives pod restarts"
            )
        if self.smtp.require_tls and not self.tls.enabled:
            raise ValueError("smtp.requireTLS needs tls.enabled")
        return self

    @property
    def effective_image(self) -> str:
        return self.image or DEFAULT_IMAGE

    @property
    def secret_names(self) -> tuple[str, ...]:
        """Every Secret the bridges read (signing secrets and the TLS one), sorted."""
        names = {ref.name for route in self.routes for ref in route.webhook.secret_refs}
        if self.tls.enabled and self.tls.secret_name:
            names.add(self.tls.secret_name)
        return tuple(sorted(names))


def check_name(name: str) -> None:
    """Raise :class:`InvalidSpecError` when children named after ``name`` would be invalid."""
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.match(name):
        raise InvalidSpecError(
            [
                f"metadata.name: {name!r} must be a DNS label of at most {MAX_NAME_LENGTH} "
                "characters starting with a letter (it names the Services and pods)"
            ]
        )


def parse(spec: Mapping[str, Any]) -> MailBridgeSpec:
    """Validate a spec (as stored in the API); raise :class:`InvalidSpecError` listing problems."""
    try:
        return MailBridgeSpec.model_validate(dict(spec))
    except ValidationError as error:
        raise InvalidSpecError(describe(error, root="spec")) from None


def describe(error: ValidationError, *, root: str) -> list[str]:
    """One line per problem: ``spec.routes[0].webhook.url: <what is wrong> (got <value>)``."""
    problems = []
    for problem in error.errors():
        path = format_path(root, problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        line = f"{path}: {message}"
        if problem["type"] not in ("missing", "value_error") and "input" in problem:
            line += f" (got {_short(problem['input'])})"
        problems.append(line)
    return problems


def format_path(root: str, location: tuple[int | str, ...]) -> str:
    path = root
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
