"""OpenTelemetry traces, configured only by the standard ``OTEL_*`` variables.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` turns it off.
The OTLP exporter is HTTP/protobuf and reads its own ``OTEL_EXPORTER_OTLP_*``
settings; ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the service.

Spans (one tracer, ``mailbridge``):

``smtp session``     SERVER, one per connection
``receive message``  child of the session, one per DATA (size, recipients, routes, TLS)
``parse message``    child of the message
``POST``             CLIENT, one per webhook attempt: a child of the message in sync
                     mode, or *linked* to it (through the saved trace context) when
                     delivered later from the spool. The W3C ``traceparent`` of this
                     span is sent with the request so receivers continue the trace.

Attribute names come from the semantic conventions (HTTP client, network, server,
URL, error); the bridge's own use the ``mailbridge.`` and ``smtp.`` namespaces.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from mailbridge import __version__
from mailbridge.config import ConfigError

TRACER_NAME = "mailbridge"
ROUTE = "mailbridge.route"
WEBHOOK_ID = "mailbridge.webhook.id"
MESSAGE_SIZE = "mailbridge.message.size_bytes"
RECIPIENTS = "mailbridge.message.recipients"
ROUTES = "mailbridge.message.routes"
OUTCOME = "mailbridge.delivery.outcome"
SMTP_TLS = "smtp.tls"
SMTP_HELO = "smtp.helo"


def exporter_from_env(environ: Mapping[str, str] | None = None) -> SpanExporter | None:
    """The exporter the ``OTEL_*`` variables ask for, or ``None`` when tracing is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not names:
        names = ["otlp"] if endpoint else []
    if "none" in names or not names:
        return None
    if "console" in names:
        return ConsoleSpanExporter()
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ConfigError(f"OTEL_TRACES_EXPORTER={','.join(names)}: supported are otlp, console, none")


def configure(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Install a tracer provider when the environment asks for traces; else leave the no-op."""
    exporter = exporter_from_env(environ)
    if exporter is None:
        return None
    resource = Resource.create({SERVICE_NAME: "mailbridge", SERVICE_VERSION: __version__})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


_NO_OP_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
#: The installed provider and its tracer, so a span costs no tracer lookup.
_cached: tuple[trace.TracerProvider, trace.Tracer] | None = None


def active() -> bool:
    """Whether a tracer provider is installed; without one every span is a no-op.

    Callers skip building spans and their attributes when it is not (the
    ``traceparent`` still goes out as :func:`carrier` makes it).
    """
    return not isinstance(trace.get_tracer_provider(), _NO_OP_PROVIDERS)


def tracer() -> trace.Tracer:
    global _cached
    provider = trace.get_tracer_provider()
    if _cached is not None and _cached[0] is provider:
        return _cached[1]
    found = trace.get_tracer(TRACER_NAME, __version__)
    # A proxy's tracer keeps the first real provider it saw: never reuse one.
    _cached = None if isinstance(provider, _NO_OP_PROVIDERS) else (provider, found)
    return found


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers (``traceparent``); empty when not tracing."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def links(saved: Mapping[str, str] | None) -> list[trace.Link]:
    """A link to the span whose context was saved with :func:`carrier`, if any."""
    if not saved:
        return []
    context = trace.get_current_span(propagate.extract(dict(saved))).get_span_context()
    return [trace.Link(context)] if context.is_valid else []
