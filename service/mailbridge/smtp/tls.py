"""TLS for STARTTLS: a certificate from files, or a self-signed one made at start.

Files come from a Kubernetes TLS Secret or cert-manager (``tls.crt`` / ``tls.key``).
Without files a self-signed certificate is generated with ``cryptography`` for the
configured hostname and ``localhost`` (SANs); senders that verify certificates
will refuse it, which is what self-signed means. TLS 1.2 is the minimum;
Python's default cipher suites (no RC4, 3DES, NULL or export) are kept.

Reads the ``tls`` and ``smtp.hostname`` settings. Raises ``ConfigError`` when the
files cannot be used.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailbridge.config import ConfigError, TlsSettings

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


def server_context(settings: TlsSettings, hostname: str) -> ssl.SSLContext | None:
    """The server-side context for STARTTLS, or ``None`` when TLS is disabled."""
    if not settings.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = getattr(ssl.TLSVersion, settings.min_version.replace(".", "_"))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if settings.cert_file is not None and settings.key_file is not None:
        _load_files(context, settings.cert_file, settings.key_file)
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
