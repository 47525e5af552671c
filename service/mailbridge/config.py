"""The bridge's settings: one validated model, loaded once and passed down.

Sources, highest priority first: keyword arguments, environment variables
(``MAILBRIDGE_<GROUP>__<FIELD>``, e.g. ``MAILBRIDGE_SMTP__PORT=2525``), a ``.env``
file in the working directory, and the YAML file named by ``MAILBRIDGE_CONFIG``
(where routes usually live). ``MAILBRIDGE_WEBHOOK_URL`` + ``MAILBRIDGE_TARGET_EMAILS``
(comma-separated) is a one-route shorthand for the simplest case.

Each stage receives only its own group (``smtp``, ``tls``, ``delivery``, ...).
Every field carries a description and, where it has one, a unit in its name.
The operator builds this same model from a ``MailBridge`` spec and serialises it
with :func:`to_yaml`, so the two can never disagree on a setting's name.

Nothing here reads the environment at import time. Secrets are ``SecretStr`` and
are redacted by :func:`to_yaml` unless asked otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

MiB = 1024 * 1024
#: Where the operator mounts the spool volume in bridge pods.
DEFAULT_SPOOL_DIRECTORY = "/var/spool/mailbridge"
DEFAULT_ROUTE = "default"
ROUTE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
PRIVATE_NETWORKS = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which field and why."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _split_commas(value: Any) -> Any:
    """Let list settings be written ``a, b`` in the environment (JSON lists work too)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return yaml.safe_load(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, int | float):
        return [value]
    return value


CommaList = Annotated[list[str], NoDecode]


class SmtpSettings(_Group):
    """The SMTP listener and its limits."""

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 or :: for all).")
    port: int = Field(2525, ge=0, le=65535, description="TCP port to listen on (0 = any free).")
    hostname: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="Name used in the greeting, EHLO reply and the self-signed certificate.",
    )
    max_message_size_bytes: int = Field(
        25 * MiB, ge=1024, description="Largest message accepted (advertised as SIZE)."
    )
    max_recipients: int = Field(100, ge=1, description="Recipients per message (452 4.5.3).")
    max_sessions: int = Field(
        1000, ge=1, description="Concurrent SMTP sessions in all (421 4.7.0)."
    )
    max_sessions_per_ip: int = Field(
        20, ge=1, description="Concurrent SMTP sessions from one client IP (421 4.7.0)."
    )
    max_unknown_recipients: int = Field(
        20, ge=1, description="Unknown recipients one session may try before 421 4.7.0 and close."
    )
    command_timeout_seconds: float = Field(
        300, gt=0, description="Time a client has to send each complete command line."
    )
    data_timeout_seconds: float = Field(
        600, gt=0, description="Time a client has to send the whole message after DATA."
    )
    session_timeout_seconds: float = Field(
        600,
        gt=0,
        description=(
            "Time a session may go on without transferring a message before it is closed, "
            "however busy it keeps itself with NOOP or refused commands."
        ),
    )
    max_data_in_flight_bytes: int = Field(
        128 * MiB,
        ge=1024,
        description=(
            "DATA bytes all sessions together may hold in memory at once; a message "
            "that does not fit is refused with 452 4.3.1 (the sender retries later)."
        ),
    )
    max_line_length_bytes: int = Field(
        65536,
        ge=1000,
        description=(
            "Longest message line accepted (RFC 5321 asks senders for <= 1000; many "
            "generators exceed it, so the default is lenient). Commands keep RFC limits."
        ),
    )
    require_tls: bool = Field(False, description="Refuse MAIL before STARTTLS (530 5.7.0).")
    proxy_protocol: bool = Field(
        False, description="Expect a PROXY protocol v1/v2 header on every connection."
    )
    trusted_proxies: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = (
        Field(
            default_factory=lambda: [ipaddress.ip_network(n) for n in PRIVATE_NETWORKS],
            description="Networks allowed to send a PROXY header; others are refused.",
        )
    )
    proxy_timeout_seconds: float = Field(5, gt=0, description="Time to wait for the PROXY header.")
    shutdown_grace_seconds: float = Field(
        30, ge=0, description="On SIGTERM, time given to open sessions to finish."
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        return _split_commas(value)


class TlsSettings(_Group):
    """STARTTLS: a certificate from files, or a self-signed one made at start."""

    enabled: bool = Field(True, description="Offer STARTTLS.")
    cert_file: Path | None = Field(None, description="PEM certificate chain (e.g. tls.crt).")
    key_file: Path | None = Field(None, description="PEM private key (e.g. tls.key).")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        "TLSv1.2", description="Lowest TLS version accepted."
    )
    reload_check_seconds: float = Field(
        10,
        ge=0,
        description=(
            "How often, at most, the certificate files are checked for a change "
            "(during a handshake); a changed pair is served without a restart."
        ),
    )

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class WebhookSettings(_Group):
    """Where and how one route's payloads are POSTed."""

    url: AnyHttpUrl = Field(description="The receiver's URL (http or https).")
    secrets: list[SecretStr] = Field(
        default_factory=list,
        description=(
            "Standard Webhooks signing secrets (whsec_<base64>); several for rotation, "
            "each signature is sent."
        ),
    )
    secret_files: list[Path] = Field(
        default_factory=list,
        description="Files holding signing secrets (a mounted Kubernetes Secret).",
    )
    timeout_seconds: float = Field(10, gt=0, description="Time allowed for one HTTP attempt.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers sent with every request."
    )

    @field_validator("secrets")
    @classmethod
    def _valid_secrets(cls, value: list[SecretStr]) -> list[SecretStr]:
        from mailbridge.delivery import signing

        for secret in value:
            signing.decode_secret(secret.get_secret_value())
        return value


class RouteSettings(_Group):
    """One route: which recipients, and which webhook receives them."""

    name: str = Field(description="Short name (lowercase, digits, - and _); a metric label.")
    recipients: list[str] = Field(
        min_length=1,
        description="Patterns: user@example.com, *@example.com, user+tag@ matches user@, or *.",
    )
    webhook: WebhookSettings

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not ROUTE_NAME_RE.match(value):
            raise ValueError("must be 1-63 chars of a-z, 0-9, - and _, starting alphanumeric")
        return value

    @field_validator("recipients")
    @classmethod
    def _valid_patterns(cls, value: list[str]) -> list[str]:
        from mailbridge import routing

        return [routing.parse_pattern(pattern).text for pattern in value]


class DeliverySettings(_Group):
    """Delivery to webhooks: mode, retries, breaker."""

    mode: Literal["sync", "spool"] | None = Field(
        None,
        description=(
            "sync: 250 only after every webhook said 2xx. spool: 250 once on disk (fsync), "
            "delivered later. Unset: spool when spool.directory exists and is writable, else sync."
        ),
    )
    sync_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per route inside one DATA reply (sync mode)."
    )
    sync_budget_seconds: float = Field(
        60, gt=0, description="Longest a DATA reply waits for the webhooks (sync mode)."
    )
    retry_initial_seconds: float = Field(
        0.5, gt=0, description="First retry delay (backoff base), in both modes."
    )
    retry_max_seconds: float = Field(
        600, gt=0, description="Longest delay between retries (full jitter below it)."
    )
    permanent_statuses: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [400, 410, 413, 415, 422],
        description=(
            "HTTP statuses that will never succeed: 554 5.6.0 (sync) / dead letter (spool). "
            "Other 4xx (401, 403, 404, 408, 429) are retried: a fixed secret or URL recovers."
        ),
    )
    breaker_failure_threshold: int = Field(
        5, ge=1, description="Consecutive failures that open a destination's circuit."
    )
    breaker_open_seconds: float = Field(
        30, gt=0, description="Time an open circuit waits before one trial request."
    )
    max_connections: int = Field(100, ge=1, description="HTTP connections kept in the pool.")

    @field_validator("permanent_statuses", mode="before")
    @classmethod
    def _split_statuses(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("permanent_statuses")
    @classmethod
    def _only_client_errors(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 400 <= status <= 499 or status in (408, 429):
                raise ValueError(f"{status} cannot be permanent (only 4xx other than 408/429)")
        return value


class SpoolSettings(_Group):
    """The durable spool (delivery mode ``spool``): where, how big, how long, how many workers."""

    directory: Path = Field(
        Path(DEFAULT_SPOOL_DIRECTORY),
        description="Spool directory (a persistent volume in Kubernetes); one bridge per spool.",
    )
    max_bytes: int = Field(
        1024 * MiB,
        ge=MiB,
        description="Spool size limit incl. dead letters; above it new mail gets 452 4.3.1.",
    )
    max_messages: int = Field(
        100_000,
        ge=1,
        description="Spooled messages limit incl. dead letters; above it new mail gets 452 4.3.1.",
    )
    max_age_seconds: float = Field(
        5 * 24 * 3600,
        gt=0,
        description=(
            "A route still failing this long after acceptance becomes a dead letter "
            "(only after a real attempt failed; an open circuit never expires mail)."
        ),
    )
    delivery_workers: int = Field(
        32, ge=1, le=10_000, description="Messages delivered concurrently from the spool."
    )
    shutdown_grace_seconds: float = Field(
        10,
        ge=0,
        description=(
            "On SIGTERM, time given to webhook attempts in flight; the rest stays spooled."
        ),
    )
    fsync: bool = Field(
        True,
        description=(
            "UNSAFE when false (tests and benchmarks only): skip fsync, so a crash or power "
            "loss can lose mail that was answered 250."
        ),
    )


class ParsingSettings(_Group):
    """What the payload carries from the MIME message."""

    header_prefixes: CommaList = Field(
        default_factory=list,
        description="Headers whose name starts with one of these are passed through (X-, List-).",
    )
    max_inline_attachment_bytes: int = Field(
        10 * MiB,
        ge=0,
        description="Attachments up to this size are sent base64-encoded; larger: metadata only.",
    )

    @field_validator("header_prefixes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_commas(value)


class HttpSettings(_Group):
    """The health and metrics server."""

    host: str = Field("127.0.0.1", description="Address for /healthz, /readyz and /metrics.")
    port: int = Field(8080, ge=0, le=65535, description="Port for /healthz, /readyz and /metrics.")


class DemoSettings(_Group):
    """The local demo, used when no route is configured."""

    inbox_dir: Path = Field(
        Path("mailbridge-inbox"), description="Folder where the demo writes each payload."
    )


class LogSettings(_Group):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="json: one object per line; console: readable; auto: console on a tty."
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    """Everything the bridge reads. Build with :func:`load`."""

    model_config = SettingsConfigDict(
        env_prefix="MAILBRIDGE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",
        validate_default=True,
    )

    config: Path | None = Field(None, description="YAML file with routes and any other setting.")
    webhook_url: AnyHttpUrl | None = Field(
        None, description="Shorthand: one route named 'default' to this URL."
    )
    target_emails: CommaList = Field(
        default_factory=list, description="Shorthand: recipients of the 'default' route."
    )
    webhook_secret: SecretStr | None = Field(None, description="Shorthand: its signing secret.")
    webhook_secret_file: Path | None = Field(None, description="Shorthand: file with the secret.")
    routes: list[RouteSettings] = Field(default_factory=list, description="The routes.")
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)  # type: ignore[arg-type]
    tls: TlsSettings = Field(default_factory=TlsSettings)  # type: ignore[arg-type]
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)  # type: ignore[arg-type]
    spool: SpoolSettings = Field(default_factory=SpoolSettings)  # type: ignore[arg-type]
    parsing: ParsingSettings = Field(default_factory=ParsingSettings)  # type: ignore[arg-type]
    http: HttpSettings = Field(default_factory=HttpSettings)  # type: ignore[arg-type]
    demo: DemoSettings = Field(default_factory=DemoSettings)  # type: ignore[arg-type]
    log: LogSettings = Field(default_factory=LogSettings)  # type: ignore[arg-type]

    @field_validator("target_emails", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return _split_commas(value)

    @model_validator(mode="after")
    def _shorthand_into_routes(self) -> Settings:
        if self.webhook_url is None:
            if self.target_emails:
                raise ValueError("target_emails is set but webhook_url is not")
            return self
        if not self.target_emails:
            raise ValueError("webhook_url is set but target_emails is empty")
        if any(route.name == DEFAULT_ROUTE for route in self.routes):
            raise ValueError(f"the shorthand route '{DEFAULT_ROUTE}' clashes with a route's name")
        webhook = WebhookSettings(
            url=self.webhook_url,
            secrets=[self.webhook_secret] if self.webhook_secret else [],
            secret_files=[self.webhook_secret_file] if self.webhook_secret_file else [],
        )
        self.routes.append(
            RouteSettings(name=DEFAULT_ROUTE, recipients=self.target_emails, webhook=webhook)
        )
        # The shorthand has become a route; keep a single source of truth.
        self.webhook_url, self.target_emails = None, []
        self.webhook_secret = self.webhook_secret_file = None
        return self

    @model_validator(mode="after")
    def _unique_route_names(self) -> Settings:
        names = [route.name for route in self.routes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"route names must be unique, repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _resolve_delivery_mode(self) -> Settings:
        # Only an unset mode looks at the disk: an explicit one (the operator's) never does.
        if self.delivery.mode is None:
            self.delivery.mode = "spool" if spool_directory_usable(self.spool.directory) else "sync"
        return self

    @property
    def demo_mode(self) -> bool:
        """No route configured: run the local demo."""
        return not self.routes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        path = os.environ.get("MAILBRIDGE_CONFIG")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def spool_directory_usable(directory: Path) -> bool:
    """Whether ``directory`` exists and this process may write in it (the default-mode test)."""
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def load(**overrides: Any) -> Settings:
    """Build the settings from all sources; raise :class:`ConfigError` with a clear message."""
    path = os.environ.get("MAILBRIDGE_CONFIG")
    if path:
        _check_yaml_file(Path(path))
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(describe(error)) from None


class _Given(Settings):
    """Settings from the given values only: no environment, no ``.env``, no YAML file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def from_mapping(values: Mapping[str, Any]) -> Settings:
    """Settings from ``values`` alone, whatever the process environment holds.

    For callers that build settings from their own data (the operator from a
    MailBridge spec, tests); raises pydantic's ``ValidationError`` (see :func:`describe`).
    Note that ``Settings.model_validate`` would still read ``MAILBRIDGE_*`` variables.
    """
    return _Given.model_validate(dict(values))


def _check_yaml_file(path: Path) -> None:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"MAILBRIDGE_CONFIG={path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"MAILBRIDGE_CONFIG={path}: not valid YAML: {error}") from None
    if document is not None and not isinstance(document, dict):
        raise ConfigError(f"MAILBRIDGE_CONFIG={path}: must hold a mapping of settings")


def describe(error: ValidationError) -> str:
    """One line per problem: the field's dotted path, what is wrong, and the value given."""
    lines = ["invalid configuration:"]
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(settings)"
        message = problem["msg"].removeprefix("Value error, ")
        line = f"  {location}: {message}"
        if problem["type"] != "missing" and "input" in problem:
            if "secret" in location or "headers" in location:
                shown = "<redacted>"
            elif "url" in location and isinstance(problem["input"], str):
                shown = _short(redact_url(problem["input"]))
            else:
                shown = _short(problem["input"])
            line += f" (got {shown})"
        lines.append(line)
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_URL_PASSWORD = re.compile(r"(?<=://)([^/?#@:]*):[^/?#@]*@")
_URL_QUERY = re.compile(r"([?&][^=&#]*)=[^&#]*")


def redact_url(url: str) -> str:
    """``url`` without its password and query values (tokens often ride there)."""
    url = _URL_PASSWORD.sub(r"\1:<redacted>@", url)
    return _URL_QUERY.sub(r"\1=<redacted>", url)


def to_yaml(settings: Settings, *, reveal_secrets: bool = False, for_display: bool = False) -> str:
    """Serialise as the YAML file the bridge reads (MAILBRIDGE_CONFIG); secrets redacted.

    ``for_display`` (``check-config``) also hides webhook URL passwords and query
    values and every extra header's value (``Authorization``...); the result is then
    for reading, not for the bridge.
    """
    data = settings.model_dump(mode="json", exclude={"config"})
    for key in ("webhook_url", "webhook_secret", "webhook_secret_file"):
        data.pop(key, None)
    data.pop("target_emails", None)
    for route_data, route in zip(data["routes"], settings.routes, strict=True):
        webhook = route_data["webhook"]
        if reveal_secrets:
            webhook["secrets"] = [s.get_secret_value() for s in route.webhook.secrets]
        if for_display:
            webhook["url"] = redact_url(webhook["url"])
            webhook["headers"] = {name: "<redacted>" for name in webhook["headers"]}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def reference() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, for the README."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, _Group):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            if name == "routes":
                rows.append(("routes", "[]", _ROUTES_HELP))
                continue
            if name == "hostname":
                default = "(this host's name)"
            elif field.default_factory is not None:
                default = _show(field.default_factory())  # type: ignore[call-arg]
            else:
                default = _show(field.default)
            rows.append((f"{prefix}{name.upper()}", default, field.description or ""))

    walk(Settings, "MAILBRIDGE_")
    return rows


_ROUTES_HELP = (
    "In the MAILBRIDGE_CONFIG file only. List of routes: `name`, `recipients` (patterns), "
    "`webhook` (`url`, `secrets`, `secret_files`, `timeout_seconds`, `headers`)."
)


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "[]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def reference_markdown() -> str:
    lines = ["| Setting | Default | Meaning |", "|---|---|---|"]
    for name, default, description in reference():
        lines.append(f"| `{name}` | {f'`{default}`' if default else ''} | {description} |")
    return "\n".join(lines) + "\n"
