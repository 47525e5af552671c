"""The local demo: what ``mailbridge`` does with no route configured.

It runs the real pipeline end to end: one route named ``demo`` takes mail for a
few reserved demo domains and POSTs signed payloads to an inbox endpoint served
by the bridge's own HTTP server (``/demo/inbox``). The inbox checks the Standard
Webhooks signature like any receiver should, prints a readable summary, and
writes the payload as a JSON file into ``demo.inbox_dir``.

Listens on 127.0.0.1 only (the defaults); never relays; reads ``demo`` settings.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web
from pydantic import SecretStr

from mailbridge.config import RouteSettings, WebhookSettings
from mailbridge.delivery import signing

ROUTE = "demo"
PATH = "/demo/inbox"
DOMAINS = ("localhost", "example.com", "example.org", "example.net", "mailbridge.local")
PREVIEW_CHARS = 300


def route(http_port: int, secret: str) -> RouteSettings:
    return RouteSettings(
        name=ROUTE,
        recipients=[f"*@{domain}" for domain in DOMAINS],
        webhook=WebhookSettings(
            url=f"http://127.0.0.1:{http_port}{PATH}",  # type: ignore[arg-type]
            secrets=[SecretStr(secret)],
        ),
    )


def verified(secret: str, headers: Any, body: bytes) -> bool:
    """Whether one of the request's ``v1`` signatures matches ``secret``."""
    webhook_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not timestamp.isdigit():
        return False
    expected = signing.sign(webhook_id, int(timestamp), body, [signing.decode_secret(secret)])
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)


def summary(payload: dict[str, Any], *, signature_ok: bool, saved: Path) -> str:
    sender = payload.get("sender") or "(no sender)"
    if payload.get("sender_name"):
        sender = f"{payload['sender_name']} <{sender}>"
    body = (payload.get("body") or "").strip()
    if len(body) > PREVIEW_CHARS:
        body = body[:PREVIEW_CHARS] + " ..."
    attachments = payload.get("attachments") or []
    lines = [
        f"--- webhook received: {payload.get('id')} (route {payload.get('route')}) ---",
        f"From:        {sender}",
        f"To:          {', '.join(payload.get('recipients') or [])}",
        f"Subject:     {payload.get('subject')}",
        f"Signature:   {'verified' if signature_ok else 'INVALID'} (Standard Webhooks v1)",
    ]
    if attachments:
        names = ", ".join(
            f"{a.get('filename') or '(unnamed)'} ({a.get('size_bytes')} bytes)" for a in attachments
        )
        lines.append(f"Attachments: {names}")
    lines += ["", *(f"  {line}" for line in body.splitlines() or ["(empty body)"]), ""]
    lines.append(f"Saved:       {saved}")
    return "\n".join(lines) + "\n"


def _save(inbox_dir: Path, payload: dict[str, Any]) -> Path:
    inbox_dir.mkdir(parents=True, exist_ok=True)
    name = str(payload.get("id", "message")).replace("/", "_")
    saved = (inbox_dir / f"{name}.json").resolve()
    saved.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return saved


def add_inbox(app: web.Application, secret: str, inbox_dir: Path, out: TextIO = sys.stdout) -> None:
    """Serve the demo inbox on ``app``."""

    async def inbox(request: web.Request) -> web.Response:
        body = await request.read()
        signature_ok = verified(secret, request.headers, body)
        try:
            payload = json.loads(body)
        except ValueError:
            return web.Response(status=400, text="not JSON\n")
        saved = await asyncio.to_thread(_save, inbox_dir, payload)
        out.write(summary(payload, signature_ok=signature_ok, saved=saved))
        out.flush()
        return web.Response(status=204 if signature_ok else 401)

    app.router.add_post(PATH, inbox)


def banner(smtp_host: str, smtp_port: int, http_port: int, inbox_dir: Path) -> str:
    to = f"you@{DOMAINS[0]}"
    return (
        f"mailbridge demo: no route configured, so mail to *@{', *@'.join(DOMAINS)}\n"
        f"is delivered as a signed webhook to the built-in inbox and saved in {inbox_dir}/.\n"
        f"\n"
        f"  SMTP   {smtp_host}:{smtp_port}\n"
        f"  HTTP   http://127.0.0.1:{http_port}/healthz  /readyz  /metrics\n"
        f"\n"
        f"Send a test mail from another terminal:\n"
        f"  .venv/bin/mailbridge send-test --port {smtp_port}\n"
        f"  swaks --server {smtp_host}:{smtp_port} --to {to} --body 'hello'\n"
        f"\n"
        f"Configure real routes with MAILBRIDGE_WEBHOOK_URL + MAILBRIDGE_TARGET_EMAILS or a\n"
        f"routes file (MAILBRIDGE_CONFIG); see README.md. Ctrl-C stops.\n"
    )
