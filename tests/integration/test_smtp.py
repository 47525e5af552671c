"""The bridge end to end over real SMTP: smtplib, raw sockets, aiosmtplib and swaks,
with a real webhook receiver that verifies every signature (standardwebhooks)."""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import jsonschema
import pytest

import mailbridge
from mailbridge.delivery import signing
from tests.conftest import require_tool
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread, Reply, unused_port

SECRET = signing.new_secret()
OLD_SECRET = signing.new_secret()
SCHEMA = json.loads(
    (Path(mailbridge.__file__).parent / "schema" / "payload.schema.json").read_text()
)


def message(subject: str = "Hello", to: str = "billing@example.com", body: str = "Hi!") -> bytes:
    mail = EmailMessage()
    mail["From"] = "Alice Example <alice@sender.test>"
    mail["To"] = to
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{subject.replace(' ', '.')}.{time.time_ns()}@sender.test>"
    mail.set_content(body)
    return mail.as_bytes()


class Raw:
    """A raw SMTP client: exact bytes out, replies in."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", greet: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply() if greet else ""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + " | ".join(lines))
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.file.readline() == b""
        except OSError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[ReceiverThread]:
    with ReceiverThread(secrets=[SECRET]) as rx:
        yield rx
        # Every payload any test produced is valid against the published schema.
        for delivery in rx.deliveries:
            jsonschema.Draft202012Validator(SCHEMA).validate(delivery.json)


@pytest.fixture
def bridge(receiver: ReceiverThread) -> Iterator[BridgeThread]:
    with BridgeThread(
        routes=[
            route(
                "billing", ["billing@example.com"], receiver.url_for("/billing"), secrets=[SECRET]
            ),
            route(
                "support", ["*@support.example.com"], receiver.url_for("/support"), secrets=[SECRET]
            ),
        ],
        smtp={"max_recipients": 5, "max_unknown_recipients": 3, "max_message_size_bytes": 20_000},
        delivery={"sync_attempts": 2, "retry_initial_seconds": 0.05, "sync_budget_seconds": 10},
    ) as running:
        yield running


def test_a_message_becomes_one_signed_webhook_and_250_names_its_id(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("Billing+Q3@Example.com")
        code, reply = client.data(message("Invoice 42", to="billing+q3@example.com"))
    (delivery,) = receiver.wait_for(1)
    payload = delivery.json
    assert 250 == code
    assert reply.decode() == f"2.0.0 Ok: delivered as {payload['id'].removesuffix('.billing')}"
    assert payload["id"].endswith(".billing")
    assert delivery.verified, delivery.verify_error
    assert "/billing" == delivery.path
    assert payload["id"] == delivery.webhook_id
    assert ("billing", "Invoice 42") == (payload["route"], payload["subject"])
    assert ("alice@sender.test", "Alice Example") == (payload["sender"], payload["sender_name"])
    assert ["Billing+Q3@Example.com"] == payload["recipients"]
    assert "alice@sender.test" == payload["envelope"]["mail_from"]
    assert "client.test" == payload["envelope"]["helo"]
    assert "127.0.0.1" == payload["envelope"]["client_ip"]
    assert payload["envelope"]["tls"] is None
    assert "Hi!" in payload["body"]
    assert 1 == bridge.metric("mailbridge_smtp_messages_accepted_total")


def test_one_message_fans_out_to_each_route_with_only_its_recipients(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        refused = client.sendmail(
            "alice@sender.test", ["billing@example.com", "help@support.example.com"], message()
        )
    assert {} == refused
    deliveries = sorted(receiver.wait_for(2), key=lambda d: d.path)
    assert ["/billing", "/support"] == [d.path for d in deliveries]
    assert [["billing@example.com"], ["help@support.example.com"]] == [
        d.json["recipients"] for d in deliveries
    ]
    # One id per (message, route): a receiver behind both routes keeps both.
    billing_id, support_id = (d.webhook_id for d in deliveries)
    assert billing_id.removesuffix(".billing") == support_id.removesuffix(".support")
    assert billing_id != support_id


def test_ehlo_advertises_the_extensions_we_honour(bridge: BridgeThread) -> None:
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        code, _ = client.ehlo("client.test")
        features = client.esmtp_features
    assert 250 == code
    assert {"pipelining", "8bitmime", "smtputf8", "size", "enhancedstatuscodes", "starttls"} <= set(
        features
    )
    assert "20000" == features["size"]
    assert "auth" not in features


def test_every_reply_after_the_greeting_carries_an_enhanced_code(bridge: BridgeThread) -> None:
    raw = Raw(bridge.smtp_port)
    try:
        replies = [
            raw.command("NOOP"),
            raw.command("MAIL FROM:<a@b.test>"),  # before EHLO
            raw.command("EHLO client.test"),
            raw.command("RCPT TO:<billing@example.com>"),  # before MAIL
            raw.command("DATA"),  # before RCPT
            raw.command("BOGUS"),
            raw.command("MAIL FROM:<a@b.test> SIZE=999999"),
            raw.command("mail from:<a@b.test>"),
            raw.command("MAIL FROM:<a@b.test>"),  # nested
            raw.command("rcpt to:<nobody@example.com>"),
            raw.command("RCPT TO:<user%evil.test@example.com>"),
            raw.command("RCPT TO:<billing@example.com> NOTIFY=NEVER"),
            raw.command("VRFY billing@example.com"),
            raw.command("AUTH PLAIN AGFhAGI="),
            raw.command("RSET"),
            raw.command("HELP"),
            raw.command("QUIT"),
        ]
    finally:
        raw.close()
    codes = [reply.split("\n")[-1][:9] for reply in replies]
    assert [
        "250 2.0.0",
        "503 5.5.1",
        "250 HELP",  # EHLO replies carry no enhanced code (RFC 2034)
        "503 5.5.1",
        "503 5.5.1",
        "500 5.5.2",
        "552 5.3.4",
        "250 2.1.0",
        "503 5.5.1",
        "550 5.1.1",
        "550 5.7.1",
        "555 5.5.4",
        "252 2.0.0",
        "502 5.5.1",
        "250 2.0.0",
        "250 2.0.0",
        "221 2.0.0",
    ] == codes
    assert raw.greeting.startswith("220 mx.test ")


def test_null_sender_is_accepted_for_bounces(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    raw = Raw(bridge.smtp_port)
    try:
        raw.command("EHLO client.test")
        assert raw.command("MAIL FROM:<>").startswith("250 2.1.0")
        assert raw.command("RCPT TO:<billing@example.com>").startswith("250 2.1.5")
        assert raw.command("DATA").startswith("354")
        raw.send(b"Subject: bounce\r\n\r\nDelivery failed\r\n.\r\n")
        assert raw.reply().startswith("250 2.0.0")
    finally:
        raw.close()
    (delivery,) = receiver.wait_for(1)
    assert "" == delivery.json["envelope"]["mail_from"]


def test_pipelined_commands_in_one_packet_get_replies_in_order(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    raw = Raw(bridge.smtp_port)
    try:
        raw.command("EHLO client.test")
        raw.send(
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<nobody@example.com>\r\n"
            b"RCPT TO:<billing@example.com>\r\nDATA\r\n"
        )
        replies = [raw.reply() for _ in range(4)]
        raw.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        replies += [raw.reply(), raw.reply()]
    finally:
        raw.close()
    assert ["250", "550", "250", "354", "250", "221"] == [r[:3] for r in replies]
    assert "piped" == receiver.wait_for(1)[0].json["subject"]


def test_unknown_recipients_are_refused_and_too_many_close_the_session(
    bridge: BridgeThread,
) -> None:
    raw = Raw(bridge.smtp_port)
    try:
        raw.command("EHLO client.test")
        raw.command("MAIL FROM:<a@b.test>")
        replies = [raw.command(f"RCPT TO:<guess{i}@example.com>") for i in range(4)]
        assert raw.closed()
    finally:
        raw.close()
    assert ["550 5.1.1"] * 3 + ["421 4.7.0"] == [r[:9] for r in replies]
    assert 3 == bridge.metric("mailbridge_smtp_messages_rejected_total", reason="unknown_recipient")


def test_too_many_recipients_is_452_and_the_first_ones_still_deliver(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        client.ehlo("client.test")
        client.mail("a@b.test")
        codes = [client.rcpt(f"u{i}@support.example.com")[0] for i in range(6)]
        code, _ = client.data(message())
    assert [250] * 5 + [452] == codes
    assert 250 == code
    assert 5 == len(receiver.wait_for(1)[0].json["recipients"])


def test_oversized_messages_get_552_and_the_session_goes_on(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        client.ehlo("client.test")
        client.mail("a@b.test")
        client.rcpt("billing@example.com")
        reply = client.data(message(body="x" * 60 + "\n") * 400)
        assert (552, b"5.3.4 Message size exceeds fixed maximum message size") == reply
        assert 250 == client.noop()[0]
        assert {} == client.sendmail("a@b.test", ["billing@example.com"], message("after"))
    assert ["after"] == [d.json["subject"] for d in receiver.wait_for(1)]


def test_starttls_then_mail_reports_tls_and_a_second_starttls_is_refused(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        assert "starttls" not in client.esmtp_features
        assert (503, b"5.5.1 TLS already active") == client.docmd("STARTTLS")
        client.sendmail("a@b.test", ["billing@example.com"], message("secret stuff"))
        version = client.sock.version()  # type: ignore[union-attr]
    tls = receiver.wait_for(1)[0].json["envelope"]["tls"]
    assert version == tls["version"]
    assert tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert 1 == bridge.metric("mailbridge_smtp_tls_sessions_total")


def test_the_server_refuses_tls_below_its_minimum(receiver: ReceiverThread) -> None:
    def client_context(maximum: ssl.TLSVersion) -> ssl.SSLContext:
        context = ssl._create_unverified_context()
        context.maximum_version = maximum
        return context

    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], tls={"min_version": "TLSv1.3"}
    ) as bridge:
        with (
            smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client,
            pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)),
        ):
            client.starttls(context=client_context(ssl.TLSVersion.TLSv1_2))
        with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
            client.starttls(context=client_context(ssl.TLSVersion.TLSv1_3))
            assert "TLSv1.3" == client.sock.version()  # type: ignore[union-attr]
            assert 250 == client.noop()[0]


def test_webhook_outcomes_become_smtp_replies(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
            client.ehlo("client.test")
            client.mail("a@b.test")
            client.rcpt("billing@example.com")
            try:
                return client.data(message())
            except smtplib.SMTPDataError as error:
                return error.smtp_code, error.smtp_error

    receiver.respond_with(503, 503)
    code, text = send()
    assert (451, True) == (code, text.startswith(b"4.3.0 ")), text
    assert b"try again later" in text
    receiver.respond_with(400)
    code, text = send()
    assert (554, True) == (code, text.startswith(b"5.6.0 ")), text
    receiver.respond_with(503, 200)
    assert 250 == send()[0]
    assert 1 == bridge.metric("mailbridge_smtp_messages_rejected_total", reason="temp_failure")
    assert 1 == bridge.metric("mailbridge_smtp_messages_rejected_total", reason="permanent_failure")


def test_the_same_message_retried_by_the_mta_keeps_its_id(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    body = message("retry me")
    receiver.respond_with(503, 503)
    with (
        smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client,
        pytest.raises(smtplib.SMTPDataError),
    ):
        client.sendmail("a@b.test", ["billing@example.com"], body)
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        client.sendmail("a@b.test", ["billing@example.com"], body)
    deliveries = receiver.wait_for(3)
    assert 1 == len({d.webhook_id for d in deliveries})


def test_unreachable_webhook_answers_451_never_250() -> None:
    with (
        BridgeThread(
            routes=[route("down", ["*"], f"http://127.0.0.1:{unused_port()}/")],
            delivery={"sync_attempts": 2, "retry_initial_seconds": 0.01},
        ) as bridge,
        smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client,
        pytest.raises(smtplib.SMTPDataError) as failed,
    ):
        client.sendmail("a@b.test", ["x@y.test"], message())
    assert 451 == failed.value.smtp_code
    assert b"connection" in failed.value.smtp_error.lower()


def test_open_circuit_answers_451_at_once_without_calling_the_webhook() -> None:
    with (
        ReceiverThread() as rx,
        BridgeThread(
            routes=[route("flaky", ["*"], rx.url)],
            delivery={
                "sync_attempts": 1,
                "breaker_failure_threshold": 2,
                "breaker_open_seconds": 60,
            },
        ) as bridge,
    ):
        rx.respond(lambda delivery: 500)
        for _ in range(3):
            with (
                smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client,
                pytest.raises(smtplib.SMTPDataError) as failed,
            ):
                client.sendmail("a@b.test", ["x@y.test"], message())
            assert 451 == failed.value.smtp_code
        assert 2 == len(rx.deliveries)
        assert 1 == bridge.metric("mailbridge_webhook_circuit_state", route="flaky", state="open")


def test_require_tls_refuses_mail_before_starttls(receiver: ReceiverThread) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url, secrets=[SECRET])], smtp={"require_tls": True}
    ) as bridge:
        with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
            client.ehlo("client.test")
            assert 530 == client.mail("a@b.test")[0]
            _code, text = client.mail("a@b.test")
            assert text.startswith(b"5.7.0 ")
            context = ssl._create_unverified_context()
            client.starttls(context=context)
            client.ehlo("client.test")
            assert 250 == client.mail("a@b.test")[0]
        assert 2 == bridge.metric("mailbridge_smtp_messages_rejected_total", reason="tls_required")


def test_sessions_per_ip_are_capped_with_421(receiver: ReceiverThread) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"max_sessions_per_ip": 2}
    ) as bridge:
        first, second = Raw(bridge.smtp_port), Raw(bridge.smtp_port)
        third = Raw(bridge.smtp_port)
        try:
            assert third.greeting.startswith("421 4.7.0")
            assert third.closed()
            first.command("QUIT")
            time.sleep(0.2)
            fourth = Raw(bridge.smtp_port)
            assert fourth.greeting.startswith("220 ")
            fourth.close()
        finally:
            for raw in (first, second, third):
                raw.close()
        assert 1 == bridge.metric(
            "mailbridge_smtp_connections_refused_total", reason="max_sessions_per_ip"
        )


def test_proxy_protocol_gives_the_real_client_ip(receiver: ReceiverThread) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"proxy_protocol": True}
    ) as bridge:
        raw = Raw(bridge.smtp_port, greet=False)
        try:
            raw.send(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 25\r\n")
            assert raw.reply().startswith("220 ")
            raw.command("EHLO client.test")
            raw.command("MAIL FROM:<a@b.test>")
            raw.command("RCPT TO:<x@y.test>")
            raw.command("DATA")
            raw.send(b"Subject: proxied\r\n\r\nhi\r\n.\r\n")
            assert raw.reply().startswith("250 ")
        finally:
            raw.close()
    assert "203.0.113.7" == receiver.wait_for(1)[0].json["envelope"]["client_ip"]


def test_proxy_header_from_an_untrusted_peer_is_refused(receiver: ReceiverThread) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        smtp={"proxy_protocol": True, "trusted_proxies": ["10.0.0.0/8"]},
    ) as bridge:
        raw = Raw(bridge.smtp_port, greet=False)
        try:
            raw.send(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 25\r\n")
            assert raw.closed()
        finally:
            raw.close()
        assert 1 == bridge.metric(
            "mailbridge_smtp_connections_refused_total", reason="untrusted_proxy"
        )


def test_a_silent_client_is_disconnected_after_the_command_timeout(
    receiver: ReceiverThread,
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"command_timeout_seconds": 0.5}
    ) as bridge:
        raw = Raw(bridge.smtp_port)
        try:
            started = time.monotonic()
            raw.send(b"EH")  # a slow client that never finishes its line
            assert raw.closed()
            assert time.monotonic() - started < 5
        finally:
            raw.close()


def test_a_client_vanishing_mid_data_delivers_nothing(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    raw = Raw(bridge.smtp_port)
    raw.command("EHLO client.test")
    raw.command("MAIL FROM:<a@b.test>")
    raw.command("RCPT TO:<billing@example.com>")
    raw.command("DATA")
    raw.send(b"Subject: half\r\n\r\nthis never ends")
    raw.close()
    time.sleep(0.3)
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        assert 250 == client.noop()[0]
    assert [] == receiver.deliveries


def test_internal_errors_answer_451_without_details(
    bridge: BridgeThread, receiver: ReceiverThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailbridge import parsing

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(parsing, "parse", explode)
    with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
        client.ehlo("client.test")
        client.mail("a@b.test")
        client.rcpt("billing@example.com")
        code, text = client.data(message())
        assert 250 == client.noop()[0]
    assert 451 == code
    assert text.startswith(b"4.3.0 ")
    assert b"secret" not in text
    assert [] == receiver.deliveries


def test_utf8_addresses_and_8bit_bodies_with_smtputf8(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    raw = Raw(bridge.smtp_port)
    try:
        raw.command("EHLO client.test")
        assert raw.command("MAIL FROM:<jösé@sender.test> SMTPUTF8 BODY=8BITMIME")[:3] == "250"
        assert raw.command("RCPT TO:<tëst@support.example.com>")[:3] == "250"
        raw.command("DATA")
        raw.send("Subject: héllo\r\nFrom: jösé@sender.test\r\n\r\nçà va\r\n.\r\n".encode())
        assert raw.reply()[:3] == "250"
    finally:
        raw.close()
    payload = receiver.wait_for(1)[0].json
    assert ("héllo", ["tëst@support.example.com"]) == (payload["subject"], payload["recipients"])
    assert "çà va" in payload["body"]


async def test_aiosmtplib_client_delivers(bridge: BridgeThread, receiver: ReceiverThread) -> None:
    errors, reply = await aiosmtplib.send(
        message("from aiosmtplib"),
        sender="a@b.test",
        recipients=["billing@example.com"],
        hostname="127.0.0.1",
        port=bridge.smtp_port,
        start_tls=True,
        validate_certs=False,
    )
    assert {} == errors
    assert reply.startswith("2.0.0 Ok: delivered as msg_")
    assert "from aiosmtplib" == receiver.wait_for(1)[0].json["subject"]


def test_swaks_delivers_with_starttls_and_an_attachment(
    bridge: BridgeThread, receiver: ReceiverThread, tmp_path
) -> None:
    swaks = require_tool("swaks")
    attachment = tmp_path / "report.csv"
    attachment.write_text("a,b\n1,2\n")
    result = subprocess.run(
        [
            swaks, "--server", f"127.0.0.1:{bridge.smtp_port}", "--tls",
            "--from", "alice@sender.test", "--to", "help@support.example.com",
            "--header", "Subject: from swaks", "--body", "swaks body",
            "--attach", f"@{attachment}", "--attach-type", "text/csv",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert 0 == result.returncode, result.stdout + result.stderr
    payload = receiver.wait_for(1)[0].json
    assert ("from swaks", "support") == (payload["subject"], payload["route"])
    assert ["report.csv"] == [a["filename"] for a in payload["attachments"]]
    assert payload["envelope"]["tls"] is not None


def test_rotated_secrets_verify_with_either(receiver: ReceiverThread) -> None:
    with (
        ReceiverThread(secrets=[OLD_SECRET]) as old_only,
        BridgeThread(
            routes=[route("r", ["*"], old_only.url, secrets=[SECRET, OLD_SECRET])]
        ) as bridge,
    ):
        with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
            client.sendmail("a@b.test", ["x@y.test"], message())
        (delivery,) = old_only.wait_for(1)
    assert delivery.verified, delivery.verify_error
    assert 2 == len(delivery.signatures)


def test_slow_webhook_beyond_the_sync_budget_answers_451(receiver: ReceiverThread) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url, timeout_seconds=5)],
        delivery={"sync_budget_seconds": 0.5, "sync_attempts": 1},
    ) as bridge:
        receiver.respond_with(Reply.slow(3))
        with (
            smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client,
            pytest.raises(smtplib.SMTPDataError) as failed,
        ):
            client.sendmail("a@b.test", ["x@y.test"], message())
    assert 451 == failed.value.smtp_code


def test_total_sessions_are_capped_with_421(receiver: ReceiverThread) -> None:
    with BridgeThread(routes=[route("r", ["*"], receiver.url)], smtp={"max_sessions": 2}) as bridge:
        held = [Raw(bridge.smtp_port), Raw(bridge.smtp_port)]
        extra = Raw(bridge.smtp_port)
        try:
            assert extra.greeting.startswith("421 4.7.0")
            assert extra.closed()
        finally:
            for raw in [*held, extra]:
                raw.close()
        assert 1 == bridge.metric(
            "mailbridge_smtp_connections_refused_total", reason="max_sessions"
        )


def test_a_message_line_over_the_limit_gets_500_and_the_session_goes_on(
    receiver: ReceiverThread,
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"max_line_length_bytes": 1000}
    ) as bridge:
        raw = Raw(bridge.smtp_port)
        try:
            raw.command("EHLO client.test")
            raw.command("MAIL FROM:<a@b.test>")
            raw.command("RCPT TO:<x@y.test>")
            raw.command("DATA")
            raw.send(b"Subject: long\r\n\r\n" + b"x" * 1001 + b"\r\n.\r\n")
            assert raw.reply().startswith("500 5.5.2 Line too long")
            assert raw.command("NOOP").startswith("250 2.0.0")
        finally:
            raw.close()
    assert [] == receiver.deliveries


def test_a_client_too_slow_to_finish_data_is_disconnected(receiver: ReceiverThread) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"data_timeout_seconds": 0.5}
    ) as bridge:
        raw = Raw(bridge.smtp_port)
        try:
            raw.command("EHLO client.test")
            raw.command("MAIL FROM:<a@b.test>")
            raw.command("RCPT TO:<x@y.test>")
            raw.command("DATA")
            started = time.monotonic()
            for _ in range(20):  # a trickle that keeps sending but never ends
                try:
                    raw.send(b"x")
                except OSError:
                    break
                time.sleep(0.1)
            assert raw.closed()
            assert time.monotonic() - started < 5
        finally:
            raw.close()
    assert [] == receiver.deliveries
