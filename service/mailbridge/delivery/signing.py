"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``.

Secrets are ``whsec_<base64>`` strings (the prefix is optional); several may be
active at once for rotation, and one signature per secret is sent, separated by
spaces. Pure; trusts its inputs; emits nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _random
from collections.abc import Iterable, Sequence

PREFIX = "whsec_"
MIN_SECRET_BYTES = 16


def decode_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_...`` secret; ``ValueError`` when it is not one."""
    body = text.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "a signing secret must be base64 (optionally prefixed whsec_); "
            "make one with `mailbridge gen-secret`"
        ) from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"a signing secret must hold at least {MIN_SECRET_BYTES} bytes")
    return key


def new_secret() -> str:
    """A fresh random secret in the ``whsec_`` form."""
    return PREFIX + base64.b64encode(_random.token_bytes(32)).decode("ascii")


def sign(webhook_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> str:
    """The ``webhook-signature`` header value: one ``v1,...`` per key."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
        for key in keys
    )


def sign_parts(
    webhook_id: str, timestamp: int, parts: Iterable[bytes], keys: Sequence[bytes]
) -> str:
    """:func:`sign` of the body the ``parts`` make, without joining them."""
    prefix = f"{webhook_id}.{timestamp}.".encode()
    macs = [hmac.new(key, prefix, hashlib.sha256) for key in keys]
    for part in parts:
        for mac in macs:
            mac.update(part)
    return " ".join("v1," + base64.b64encode(mac.digest()).decode("ascii") for mac in macs)
