"""Open-relay forms, enumeration, and bytes no field may carry: refused, even with a catch-all."""

from __future__ import annotations

import logging

import pytest

from tests.hardening.smtp_client import Raw, still_serves, transaction
from tests.support.bridge import BridgeThread
from tests.support.receiver import ReceiverThread

#: Addresses that name another host to relay through. A catch-all route wants every
#: well-formed address, so each of these must be refused on its syntax alone.
RELAY_FORMS = [
    "<user%evil.test@example.com>",  # the % hack
    "<user%evil.test%example.com@example.com>",
    "<evil.test!user@example.com>",  # a UUCP bang path
    "<user!evil.test@example.com>",
    "<@evil.test:user@example.com>",  # a source route
    "<@evil.test,@other.test:user@example.com>",
    "<@evil.test:billing@example.com>",  # a source route to a real route's address
    '<"user@evil.test"@example.com>',  # a quoted local part hiding another address
    '<"user%evil.test"@example.com>',
    '<"evil.test!user"@example.com>',
    "<user@[127.0.0.1]>",  # IP literals
    "<user@[192.0.2.1]>",
    "<user@[IPv6:2001:db8::1]>",
    "<postmaster>",  # no domain at all
    "<user>",
]


@pytest.mark.parametrize("address", RELAY_FORMS)
def test_relay_forms_are_refused_even_with_a_catch_all_route(
    bridge: BridgeThread, receiver: ReceiverThread, address: str
) -> None:
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        raw.command("MAIL FROM:<alice@sender.test>")
        reply = raw.command(f"RCPT TO:{address}")
        assert reply[:3] in ("550", "553", "501"), reply
        assert reply.startswith(("550 5.7.1", "553 5.1.3", "501 5.5.4")), reply
        # Nothing was accepted, so DATA has no recipient.
        assert raw.command("DATA").startswith("503 5.5.1")
    still_serves(bridge.smtp_port)
    delivered = [d.json["recipients"] for d in receiver.wait_for(1)]
    assert [["user@example.com"]] == delivered


def test_a_catch_all_still_takes_ordinary_and_quoted_addresses_for_itself(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    """The refusals above are about relaying, not about unusual but local addresses."""
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        raw.command("MAIL FROM:<alice@sender.test>")
        for address in ('"john doe"@example.com', "o'brien@example.com", "user@EXAMPLE.com."):
            reply = raw.command(f"RCPT TO:<{address}>")
            assert reply[:3] in ("250", "553"), reply
        assert raw.command("RCPT TO:<plain@example.com>").startswith("250 2.1.5")
        assert raw.command("DATA").startswith("354")
        raw.send(b"Subject: quoted\r\n\r\nhi\r\n.\r\n")
        assert raw.reply().startswith("250 2.0.0")
    (delivery,) = receiver.wait_for(1)
    for recipient in delivery.json["recipients"]:
        local, _, domain = recipient.rpartition("@")
        assert domain.lower().rstrip(".") == "example.com"
        assert not {"%", "!", "@", ":"} & set(local.strip('"'))


# Bytes that no field may carry: NUL, other control characters, and invalid UTF-8.
BAD_BYTES = [
    pytest.param(b"\x00", id="nul"),
    pytest.param(b"\x1b[31m", id="ansi-escape"),
    pytest.param(b"\r", id="bare-cr"),
    pytest.param(b"\x7f", id="del"),
    pytest.param(b"\xc2\x85", id="c1-next-line"),
    pytest.param(b"\xc2\x9b", id="c1-csi"),
    pytest.param(b"\xff\xfe", id="invalid-utf8"),
    pytest.param(b"\xc3", id="truncated-utf8"),
    pytest.param(b"\xed\xa0\x80", id="utf8-surrogate"),
]


@pytest.mark.parametrize("bad", BAD_BYTES)
def test_nul_controls_and_invalid_utf8_are_refused_in_every_envelope_field(
    bridge: BridgeThread, receiver: ReceiverThread, bad: bytes
) -> None:
    with Raw(bridge.smtp_port) as raw:
        assert raw.command(b"EHLO cli" + bad + b"ent.test").startswith("500 5.5.2")
        assert raw.command(b"HELO cli" + bad + b"ent.test").startswith("500 5.5.2")
        assert raw.command("EHLO client.test").startswith("250")
        assert raw.command(b"MAIL FROM:<al" + bad + b"ice@sender.test>").startswith("500 5.5.2")
        param = b"MAIL FROM:<alice@sender.test> X=a" + bad + b"b"
        assert raw.command(param).startswith("500 5.5.2")
        assert raw.command("MAIL FROM:<alice@sender.test>").startswith("250")
        for rcpt in (b"<us" + bad + b"er@example.com>", b"<user@exa" + bad + b"mple.com>"):
            assert raw.command(b"RCPT TO:" + rcpt).startswith("500 5.5.2")
        assert raw.command(b"RCPT TO:<user@example.com> X=a" + bad + b"b").startswith("500 5.5.2")
        assert raw.command(b"VRFY us" + bad + b"er").startswith(("252", "500", "502"))
        assert raw.command(b"NOOP " + bad).startswith("250")
        assert raw.command(b"RCPT TO:<user@example.com>").startswith("250")
        assert raw.command("DATA").startswith("354")
        # In the message itself such bytes are content: the parser cleans them.
        raw.send(b"Subject: x%sy\r\nFrom: a%s@b.test\r\n\r\nbo%sdy\r\n.\r\n" % (bad, bad, bad))
        assert raw.reply().startswith("250 2.0.0")
    (delivery,) = receiver.wait_for(1)
    assert delivery.verified
    text = delivery.body.decode("utf-8")  # the payload is valid UTF-8
    assert "\\u0000" not in text and "\x00" not in text
    assert "client.test" == delivery.json["envelope"]["helo"]
    assert ["user@example.com"] == delivery.json["recipients"]
    still_serves(bridge.smtp_port)


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<alice@",
        "MAIL FROM:<@",
        "RCPT TO:<billing@",
        "RCPT TO:<user@example.com@",
        "RCPT TO:<@hop:user@",
        "VRFY <billing@",
        "RCPT TO:a@[",
        "RCPT TO: -x@[ ",
        "MAIL FROM:a@[",
    ],
)
def test_truncated_addresses_are_malformed_not_internal_errors(
    bridge: BridgeThread, command: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by fuzzing: the stdlib address parser raised IndexError, which answered
    451 with a logged traceback (the domain-literal forms guard the same path)."""
    caplog.set_level(logging.ERROR)
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        if command.startswith("RCPT"):
            raw.command("MAIL FROM:<alice@sender.test>")
        reply = raw.command(command)
        assert reply[:1] in ("5", "2") and not reply.startswith("451"), reply
        assert raw.command("NOOP").startswith("250")
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert 0 == bridge.metric("mailbridge_smtp_messages_rejected_total", reason="temp_failure")
    still_serves(bridge.smtp_port)


def test_a_bare_cr_or_lf_cannot_split_one_command_into_two(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    """``RCPT TO:<a>\\rRCPT TO:<b>`` is one (refused) line, never two commands."""
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        raw.command("MAIL FROM:<alice@sender.test>")
        reply = raw.command(b"RCPT TO:<user@example.com>\rRCPT TO:<user%evil.test@example.com>")
        assert reply.startswith("500 5.5.2")
        assert raw.command("DATA").startswith("503")
    still_serves(bridge.smtp_port)


def test_unknown_recipient_enumeration_is_cut_off_and_vrfy_reveals_nothing(
    strict_bridge: BridgeThread,
) -> None:
    known, unknown = "billing@example.com", "nobody@example.com"
    with Raw(strict_bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        # VRFY answers the same for a real and an unknown address.
        assert raw.command(f"VRFY {known}") == raw.command(f"VRFY {unknown}")
        assert raw.command("EXPN staff")[:3] in ("502", "500")
        raw.command("MAIL FROM:<alice@sender.test>")
        replies = [raw.command(f"RCPT TO:<guess{n}@example.com>") for n in range(3)]
        assert ["550 5.1.1"] * 3 == [r[:9] for r in replies]
        assert raw.command(f"RCPT TO:<{known}>").startswith("250")  # known ones still pass
        assert raw.command(f"RCPT TO:<{unknown}>").startswith("421 4.7.0")
        assert raw.closed()
    # RSET or a new MAIL does not refill the allowance within one connection.
    with Raw(strict_bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        replies = []
        for n in range(4):
            raw.command("RSET")
            raw.command("MAIL FROM:<alice@sender.test>")
            replies.append(raw.command(f"RCPT TO:<other{n}@example.com>")[:3])
        assert ["550", "550", "550", "421"] == replies
    assert 2 == strict_bridge.metric(
        "mailbridge_smtp_messages_rejected_total", reason="rate_limited"
    )
    still_serves(strict_bridge.smtp_port, rcpt=known)


def test_many_recipients_are_capped_and_the_first_ones_still_deliver(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        raw.command("MAIL FROM:<alice@sender.test>")
        # Pipelined in one packet, as a spammer would.
        raw.send(b"".join(b"RCPT TO:<u%d@example.com>\r\n" % n for n in range(200)))
        codes = [raw.reply()[:9] for _ in range(200)]
        assert ["250 2.1.5"] * 5 + ["452 4.5.3"] * 195 == codes
        assert raw.command("DATA").startswith("354")
        raw.send(b"Subject: many\r\n\r\nhi\r\n.\r\n")
        assert raw.reply().startswith("250 2.0.0")
    (delivery,) = receiver.wait_for(1)
    assert [f"u{n}@example.com" for n in range(5)] == delivery.json["recipients"]
    still_serves(bridge.smtp_port)


def test_mail_without_a_transaction_path_is_refused(bridge: BridgeThread) -> None:
    with Raw(bridge.smtp_port) as raw:
        replies = transaction(raw, rcpt="user@example.com")
        assert [r.split("\n")[-1][:3] for r in replies] == ["250", "250", "250"]
        assert raw.command("MAIL FROM:<again@sender.test>").startswith("503 5.5.1")
        assert raw.command("RCPT TO:<@>").startswith(("501", "553", "550"))
        assert raw.command("RCPT TO:<>").startswith(("501", "553", "550"))
    still_serves(bridge.smtp_port)
