"""TLS for STARTTLS: a certificate from files, kept fresh, or a self-signed one made at start.

Files come from a Kubernetes TLS Secret or cert-manager (``tls.crt`` / ``tls.key``).
They are checked again at most every ``tls.reload_check_seconds``, during a
handshake, and a changed pair is loaded into a fresh context that new handshakes
use (the SNI callback swaps it in): a rotated certificate is served without a
restart. Changes are seen through symlinks, so Kubernetes' atomic ``..data``
swap of a mounted Secret works. A pair that cannot be loaded (half-written, key
and certificate not matching yet) is logged and the previous one kept; the
check is repeated until the new pair loads.

Without files a self-signed certificate is generated with ``cryptography`` for the
configured hostname and ``localhost`` (SANs); senders that verify certificates
will refuse it, which is what self-signed means.

Defaults: TLS 1.2 minimum (``tls.min_version``), no compression, server cipher
preference, and Python's default cipher suites (``ssl.create_default_context``:
ECDHE/DHE with AES-GCM or ChaCha20 first; no RC4, 3DES, NULL, export or
anonymous suites); TLS 1.3 suites are OpenSSL's defaults. No client certificate
is requested.

Reads the ``tls`` and ``smtp.hostname`` settings. Raises ``ConfigError`` when the
files cannot be used at start. Logs reloads (with the new certificate's expiry)
and failed reloads; never logs key material.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailbridge.config import ConfigError, TlsSettings

log = logging.getLogger("mailbridge.tls")

SELF_SIGNED_DAYS = 365


def self_signed(hostname: str) -> tuple[bytes, bytes]:
    """A fresh (certificate PEM, key PEM) pair for ``hostname`` and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _new_context(settings: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = getattr(ssl.TLSVersion, settings.min_version.replace(".", "_"))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def server_context(
    settings: TlsSettings,
    hostname: str,
    *,
    check_interval_seconds: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ssl.SSLContext | None:
    """The server-side context for STARTTLS, or ``None`` when TLS is disabled.

    With certificate files, the context reloads them when they change (see
    :class:`CertificateFiles`).
    """
    if not settings.enabled:
        return None
    context = _new_context(settings)
    if settings.cert_file is not None and settings.key_file is not None:
        files = CertificateFiles(
            settings,
            check_interval_seconds=(
                settings.reload_check_seconds
                if check_interval_seconds is None
                else check_interval_seconds
            ),
            clock=clock,
        )
        _load_files(context, settings.cert_file, settings.key_file)
        files.install(context)
    else:
        cert_pem, key_pem = self_signed(hostname)
        # load_cert_chain only reads files; keep them just long enough to load.
        with tempfile.TemporaryDirectory(prefix="mailbridge-tls-") as folder:
            cert_path, key_path = Path(folder, "tls.crt"), Path(folder, "tls.key")
            cert_path.write_bytes(cert_pem)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key_pem)
            context.load_cert_chain(cert_path, key_path)
    return context


def _load_files(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    for label, path in (("tls.cert_file", cert_file), ("tls.key_file", key_file)):
        if not path.is_file():
            raise ConfigError(f"{label}: no such file: {path}")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigError(
            f"tls.cert_file/tls.key_file: cannot load {cert_file} with {key_file}: {error}"
        ) from None


_Stamp = tuple[tuple[int, int, int, int], ...]


class CertificateFiles:
    """The certificate and key files, reloaded into a fresh context when they change.

    :meth:`install` sets the SNI callback of the context given to sessions: at each
    handshake it calls :meth:`current`, which re-checks the files at most once per
    interval and hands the newest context to the handshake. The check is two
    ``stat`` calls; loading happens only when a file's identity (device, inode,
    size, modification time, seen through symlinks) changed.
    """

    def __init__(
        self,
        settings: TlsSettings,
        *,
        check_interval_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.cert_file is not None and settings.key_file is not None
        self._settings = settings
        self._paths = (settings.cert_file, settings.key_file)
        self._interval = check_interval_seconds
        self._clock = clock
        self._checked_at = clock()
        self._stamp = self._read_stamp()
        self._context: ssl.SSLContext | None = None
        #: How many times a changed pair was loaded since start.
        self.reloads = 0

    def install(self, context: ssl.SSLContext) -> None:
        self._context = context
        context.sni_callback = self._on_handshake

    def _on_handshake(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        newest = self.current()
        if newest is not context:
            connection.context = newest

    def current(self) -> ssl.SSLContext:
        """The context with the newest loadable certificate (checking the files if due)."""
        assert self._context is not None, "install() first"
        now = self._clock()
        if now - self._checked_at >= self._interval:
            self._checked_at = now
            try:
                self.reload_if_changed()
            except Exception:  # never fail a handshake over a reload
                log.exception("TLS certificate check failed; keeping the current one")
        return self._context

    def reload_if_changed(self) -> bool:
        """Load the files into a fresh context if they changed; whether it did."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        cert_file, key_file = self._paths
        context = _new_context(self._settings)
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError, ValueError) as error:
            # Perhaps mid-rotation (certificate written, key not yet): try again later.
            log.warning(
                "TLS certificate files changed but cannot be loaded; keeping the current one",
                extra={"cert_file": str(cert_file), "error": type(error).__name__},
            )
            return False
        context.sni_callback = self._on_handshake
        self._context, self._stamp = context, stamp
        self.reloads += 1
        log.info(
            "TLS certificate reloaded",
            extra={"cert_file": str(cert_file), "not_after": _not_after(cert_file)},
        )
        return True

    def _read_stamp(self) -> _Stamp:
        stamps = []
        for path in self._paths:
            try:
                info = path.stat()  # follows symlinks: a swapped ..data target is a change
            except OSError:
                stamps.append((0, 0, -1, 0))
                continue
            stamps.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(stamps)


def _not_after(cert_file: Path) -> str:
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return "unknown"
    return certificate.not_valid_after_utc.isoformat()
