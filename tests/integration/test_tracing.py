"""Traces: the span tree of a real SMTP session, the traceparent the webhook receives,
links for later deliveries, and export through the real OTLP/HTTP exporter."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from mailbridge.config import ConfigError
from mailbridge.delivery import breaker, webhook
from mailbridge.observability import tracing
from mailbridge.observability.metrics import Metrics
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread, WebhookReceiver, unused_port


def traceparent_ids(value: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


def test_a_message_gives_session_message_parse_and_post_spans(
    span_exporter: InMemorySpanExporter,
) -> None:
    span_exporter.clear()
    with ReceiverThread() as rx, BridgeThread(routes=[route("billing", ["*"], rx.url)]) as bridge:
        with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
            client.starttls(context=__import__("ssl")._create_unverified_context())
            client.sendmail("a@b.test", ["x@y.test", "z@y.test"], b"Subject: t\r\n\r\nbody\r\n")
        (delivery,) = rx.wait_for(1)
    spans = {span.name: span for span in span_exporter.get_finished_spans()}
    session, message = spans["smtp session"], spans["receive message"]
    parse, post = spans["parse message"], spans["POST"]
    assert trace.SpanKind.SERVER == session.kind
    assert trace.SpanKind.CLIENT == post.kind
    assert session.context.span_id == message.parent.span_id
    assert message.context.span_id == parse.parent.span_id
    assert message.context.span_id == post.parent.span_id
    assert 1 == len({s.context.trace_id for s in (session, message, parse, post)})
    assert 2 == message.attributes[tracing.RECIPIENTS]
    assert ("billing",) == message.attributes[tracing.ROUTES]
    assert message.attributes[tracing.SMTP_TLS] is True
    assert session.attributes[tracing.SMTP_TLS] is True
    assert "127.0.0.1" == session.attributes["network.peer.address"]
    assert (200, "delivered", "billing") == (
        post.attributes["http.response.status_code"],
        post.attributes[tracing.OUTCOME],
        post.attributes[tracing.ROUTE],
    )
    assert delivery.webhook_id == post.attributes[tracing.WEBHOOK_ID]
    # The receiver continues the trace from the delivery span.
    assert (post.context.trace_id, post.context.span_id) == traceparent_ids(
        delivery.headers["traceparent"]
    )


def test_webhook_url_secrets_never_reach_span_attributes(
    span_exporter: InMemorySpanExporter,
) -> None:
    span_exporter.clear()

    async def attempt() -> None:
        async with WebhookReceiver() as rx:
            session = webhook.make_session(4)
            client = webhook.WebhookClient(
                session,
                breakers=breaker.Breakers(5, 30),
                permanent_statuses=[400],
                metrics=Metrics(CollectorRegistry()),
            )
            url = rx.url.replace("http://", "http://user:pw@") + "?token=SECRET"
            rx.respond_with(503)
            await client.post(webhook.Target("r", url), "msg_1", b"{}")
            await session.close()

    asyncio.run(attempt())
    (post,) = span_exporter.get_finished_spans()
    assert "SECRET" not in str(dict(post.attributes)) and "pw" not in post.attributes["url.full"]
    assert ("503", trace.StatusCode.ERROR) == (
        post.attributes["error.type"],
        post.status.status_code,
    )


def test_a_later_delivery_links_to_the_saved_message_span(
    span_exporter: InMemorySpanExporter,
) -> None:
    span_exporter.clear()
    with tracing.tracer().start_as_current_span("receive message") as message:
        saved = tracing.carrier()

    async def deliver_later() -> None:
        async with WebhookReceiver() as rx:
            session = webhook.make_session(4)
            client = webhook.WebhookClient(
                session,
                breakers=breaker.Breakers(5, 30),
                permanent_statuses=[400],
                metrics=Metrics(CollectorRegistry()),
            )
            await client.post(webhook.Target("r", rx.url), "msg_2", b"{}", link_to=saved)
            await session.close()

    asyncio.run(deliver_later())
    post = next(s for s in span_exporter.get_finished_spans() if s.name == "POST")
    assert [message.get_span_context().span_id] == [link.context.span_id for link in post.links]
    assert post.parent is None  # a new trace, linked rather than nested


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "OTLPSpanExporter"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "ConsoleSpanExporter"),
    ],
)
def test_tracing_is_configured_only_by_otel_variables(
    env: dict[str, str], expected: str | None
) -> None:
    found = tracing.exporter_from_env(env)
    assert expected == (type(found).__name__ if found is not None else None)


def test_an_unknown_exporter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER=jaeger"):
        tracing.exporter_from_env({"OTEL_TRACES_EXPORTER": "jaeger"})


class OtlpReceiver:
    """A small OTLP/HTTP trace receiver (protobuf) on 127.0.0.1, in a thread."""

    def __init__(self) -> None:
        self.spans: list[object] = []
        self.port = unused_port()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def traces(request: web.Request) -> web.Response:
            export = ExportTraceServiceRequest.FromString(await request.read())
            for resource_spans in export.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
            return web.Response(content_type="application/x-protobuf", body=b"")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_spans_reach_an_otlp_endpoint_from_the_real_process(tmp_path: Path) -> None:
    smtp_port, http_port = unused_port(), unused_port()
    with OtlpReceiver() as otlp, ReceiverThread() as rx:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
        env.update(
            MAILBRIDGE_SMTP__PORT=str(smtp_port), MAILBRIDGE_HTTP__PORT=str(http_port),
            MAILBRIDGE_WEBHOOK_URL=rx.url, MAILBRIDGE_TARGET_EMAILS="*",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp.port}",
            OTEL_SERVICE_NAME="mailbridge-test", OTEL_BSP_SCHEDULE_DELAY="100",
        )  # fmt: skip
        bridge = subprocess.Popen(
            [str(Path(sys.executable).parent / "mailbridge")], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    client = smtplib.SMTP("127.0.0.1", smtp_port, timeout=10)
                    break
                except OSError:
                    assert time.monotonic() < deadline and bridge.poll() is None
                    time.sleep(0.1)
            with client:
                client.sendmail("a@b.test", ["x@y.test"], b"Subject: otlp\r\n\r\nbody\r\n")
            (delivery,) = rx.wait_for(1)
        finally:
            bridge.send_signal(signal.SIGTERM)
            _, err = bridge.communicate(timeout=30)
        assert 0 == bridge.returncode, err
        names = {span.name: span for span in otlp.spans}
    assert {"smtp session", "receive message", "parse message", "POST"} <= set(names)
    post = names["POST"]
    trace_id, span_id = traceparent_ids(delivery.headers["traceparent"])
    assert (trace_id, span_id) == (
        int.from_bytes(post.trace_id, "big"),
        int.from_bytes(post.span_id, "big"),
    )
