"""A hostile SMTP client for the hardening tests: exact bytes out, replies in.

Every read has a timeout (``TIMEOUT_SECONDS``) so a test can never hang on a
bridge that stopped answering; every helper works on loopback only.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage

TIMEOUT_SECONDS = 10.0


def message(subject: str = "Hello", body: str = "Hi!\n", to: str = "user@example.com") -> bytes:
    mail = EmailMessage()
    mail["From"] = "Alice <alice@sender.test>"
    mail["To"] = to
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{time.time_ns()}@sender.test>"
    mail.set_content(body)
    return mail.as_bytes()


def client_tls() -> ssl.SSLContext:
    """A client context that accepts the bridge's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Raw:
    """A raw SMTP connection: send exact bytes, read whole (multi-line) replies."""

    def __init__(self, port: int, *, greet: bool = True, timeout: float = TIMEOUT_SECONDS) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply() if greet else ""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed after: " + " | ".join(lines))
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext | None = None) -> None:
        """STARTTLS and wrap the socket; the caller has already sent EHLO."""
        assert self.command("STARTTLS").startswith("220 ")
        self.file.close()
        context = context if context is not None else client_tls()
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        """Whether the server closed the connection (reading what it still sent)."""
        try:
            while self.file.readline():
                pass
        except TimeoutError:
            return False  # still open after the read timeout
        except (OSError, ValueError):
            return True  # reset by the server
        return True

    def close(self) -> None:
        for closable in (self.file, self.sock):
            with contextlib.suppress(OSError):
                closable.close()


def transaction(raw: Raw, rcpt: str = "user@example.com") -> list[str]:
    """EHLO, MAIL and one RCPT; the replies."""
    return [
        raw.command("EHLO client.test"),
        raw.command("MAIL FROM:<alice@sender.test>"),
        raw.command(f"RCPT TO:<{rcpt}>"),
    ]


def still_serves(port: int, rcpt: str = "user@example.com") -> str:
    """Deliver one normal message with smtplib; return the DATA reply (must be 250)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT_SECONDS) as client:
        client.ehlo("client.test")
        code, text = client.mail("alice@sender.test")
        assert 250 == code, text
        code, text = client.rcpt(rcpt)
        assert 250 == code, text
        code, text = client.data(message("still serving", to=rcpt))
        assert 250 == code, text
        return text.decode()
