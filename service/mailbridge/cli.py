"""The ``mailbridge`` command.

``mailbridge`` / ``mailbridge run``   run the bridge (no route configured: the local demo)
``mailbridge check-config``           print the effective settings, secrets redacted
``mailbridge send-test``              send a test message over SMTP
``mailbridge gen-secret``             print a new webhook signing secret

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import ssl
import sys
from email.message import EmailMessage
from email.utils import make_msgid

from mailbridge import __version__, app, config
from mailbridge.delivery import signing
from mailbridge.observability import logging as logs

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailbridge",
        description=(
            "Receive email over SMTP and deliver it as signed JSON webhooks. Settings come "
            "from MAILBRIDGE_* environment variables, a .env file and the YAML file named "
            "by MAILBRIDGE_CONFIG (see README.md). With no route configured, runs the "
            "local demo on 127.0.0.1:2525."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mailbridge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the bridge (the default)")
    check = commands.add_parser(
        "check-config", help="validate and print the effective settings (secrets redacted)"
    )
    check.add_argument("--quiet", action="store_true", help="only validate; print nothing")
    send = commands.add_parser("send-test", help="send a test message to a running bridge")
    send.add_argument("--host", default="127.0.0.1", help="SMTP host (default 127.0.0.1)")
    send.add_argument("--port", type=int, default=2525, help="SMTP port (default 2525)")
    send.add_argument("--to", default="you@localhost", help="recipient (default you@localhost)")
    send.add_argument("--from", dest="sender", default="sender@example.com", help="sender")
    send.add_argument("--subject", default="Hello from mailbridge", help="subject")
    send.add_argument("--starttls", action="store_true", help="use STARTTLS (any certificate)")
    send.add_argument("--timeout", type=float, default=90, help="seconds to wait (default 90)")
    commands.add_parser("gen-secret", help="print a new Standard Webhooks secret (whsec_...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "gen-secret":
        print(signing.new_secret())
        return 0
    if command == "send-test":
        return _send_test(args)
    try:
        settings = config.load()
    except config.ConfigError as error:
        print(f"mailbridge: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check-config":
        if not args.quiet:
            sys.stdout.write(config.to_yaml(settings))
        return 0
    logs.configure(settings.log, demo=settings.demo_mode)
    try:
        return asyncio.run(app.run(settings))
    except config.ConfigError as error:
        print(f"mailbridge: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130


def _test_message(args: argparse.Namespace) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"mailbridge test <{args.sender}>"
    message["To"] = args.to
    message["Subject"] = args.subject
    message["Message-ID"] = make_msgid(domain="mailbridge.local")
    message.set_content("Hello!\n\nThis message was sent by `mailbridge send-test`.\n")
    message.add_alternative(
        "<p>Hello!</p><p>This message was sent by <code>mailbridge send-test</code>.</p>",
        subtype="html",
    )
    message.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="test.csv")
    return message


def _send_test(args: argparse.Namespace) -> int:
    """Send one message step by step and print each reply, so refusals are visible."""
    message = _test_message(args)
    try:
        with smtplib.SMTP(args.host, args.port, timeout=args.timeout) as client:
            client.ehlo()
            if args.starttls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                client.starttls(context=context)
                client.ehlo()
            code, reply = client.mail(args.sender)
            if code == 250:
                code, reply = client.rcpt(args.to)
            if code == 250:
                code, reply = client.data(message.as_bytes())
    except smtplib.SMTPDataError as error:
        code, reply = error.smtp_code, error.smtp_error
    except (OSError, smtplib.SMTPException) as error:
        print(f"cannot send to {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    text = f"{code} {reply.decode(errors='replace')}"
    if code != 250:
        print(f"refused: {text}", file=sys.stderr)
        return 1
    print(f"sent to {args.to} via {args.host}:{args.port}: {text}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
