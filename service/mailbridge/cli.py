"""The ``mailbridge`` command.

``mailbridge`` / ``mailbridge run``   run the bridge (no route configured: the local demo)
``mailbridge check-config``           print the effective settings, secrets redacted
``mailbridge send-test``              send a test message over SMTP
``mailbridge gen-secret``             print a new webhook signing secret
``mailbridge spool list|show|retry|purge``   look at and act on the spool (safe while the
                                      bridge runs: see :mod:`mailbridge.spool`)

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import smtplib
import ssl
import sys
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from mailbridge import __version__, config
from mailbridge.delivery import signing
from mailbridge.observability import logging as logs
from mailbridge.spool import admin

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
    _spool_parser(commands)
    return parser


def _spool_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    spool = commands.add_parser(
        "spool",
        help="list, show, retry or purge spooled messages (safe while the bridge runs)",
        description=(
            "Work on the spool of a bridge, running or not. IDs are queue ids, webhook ids "
            "(msg_...) or a unique queue id prefix."
        ),
    )
    spool.add_argument(
        "--directory", type=Path, help="spool directory (default: spool.directory setting)"
    )
    actions = spool.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="messages with state, age, attempts, last error")
    listing.add_argument("--state", choices=admin.STATES, help="only messages in this state")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="everything about one message")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print the raw message instead")
    retry = actions.add_parser(
        "retry", aliases=["redeliver"], help="deliver again now (dead letters or deferred)"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?")
    which.add_argument("--all-dead", action="store_true", help="every dead letter")
    which.add_argument("--route", help="every dead letter of this route")
    purge = actions.add_parser("purge", help="delete a dead letter")
    purge.add_argument("id")
    purge.add_argument(
        "--force", action="store_true", help="also delete a message not yet given up"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "gen-secret":
        print(signing.new_secret())
        return 0
    if command == "send-test":
        return _send_test(args)
    if command == "spool" and args.directory is not None:
        return _spool(args, args.directory)
    try:
        settings = config.load()
    except config.ConfigError as error:
        print(f"mailbridge: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "spool":
        return _spool(args, settings.spool.directory)
    if command == "check-config":
        if not args.quiet:
            sys.stdout.write(config.to_yaml(settings, for_display=True))
        return 0
    logs.configure(settings.log, demo=settings.demo_mode)
    from mailbridge import app  # the whole bridge: only when running it (keeps tools quick)

    try:
        return asyncio.run(app.run(settings))
    except config.ConfigError as error:
        print(f"mailbridge: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130


def _spool(args: argparse.Namespace, directory: Path) -> int:
    try:
        spool = admin.Admin(directory)
        if args.action == "list":
            _spool_list(spool, args.state, as_json=args.json)
        elif args.action == "show":
            item = spool.find(args.id)
            if args.raw:
                sys.stdout.buffer.write(spool.raw(item))
            else:
                print(json.dumps(admin.describe(item), indent=2, ensure_ascii=False))
        elif args.action in ("retry", "redeliver"):
            if args.all_dead or args.route:
                done = spool.retry_dead(route=args.route)
                print(f"{len(done)} dead letters handed to the bridge for retry")
            else:
                print(spool.retry(spool.find(args.id)))
        elif args.action == "purge":
            print(spool.purge(spool.find(args.id), force=args.force))
    except admin.AdminError as error:
        print(f"mailbridge spool: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"mailbridge spool: {directory}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


def _spool_list(spool: admin.Admin, state: str | None, *, as_json: bool) -> None:
    now = time.time()
    rows = [item for item in spool.items() if state in (None, item.state_name(now))]
    if as_json:
        for item in rows:
            print(json.dumps(admin.describe(item, now), ensure_ascii=False))
        return
    print(f"{'QUEUE ID':<22} {'STATE':<9} {'AGE':>5} {'TRIES':>5} {'NEXT':>6}  ROUTES  LAST ERROR")
    for item in rows:
        item_state = item.state
        due = item_state.next_attempt_at
        next_in = admin.age(due - now) if due is not None and due > now else "-"
        routes = ",".join(f"{name}({route.status[0]})" for name, route in item_state.routes.items())
        print(
            f"{item.queue_id:<22} {item.state_name(now):<9} "
            f"{admin.age(now - item.header.received_at):>5} {item_state.attempts:>5} "
            f"{next_in:>6}  {routes}  {item_state.last_error}"
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{len(rows)} messages ({spool.root}, {stamp})", file=sys.stderr)


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
