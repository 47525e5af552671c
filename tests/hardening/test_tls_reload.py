"""Certificate rotation without a restart: a real handshake sees the new certificate."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from mailbridge.config import ConfigError, TlsSettings
from mailbridge.smtp import tls
from tests.hardening.smtp_client import Raw, still_serves
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread


class SecretVolume:
    """A folder laid out like a mounted Kubernetes Secret, updated the way kubelet does.

    ``tls.crt -> ..data/tls.crt``, ``..data -> ..<version>``; an update writes a new
    version folder and swaps ``..data`` atomically (rename of a symlink).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        for name in ("tls.crt", "tls.key"):
            (root / name).symlink_to(Path("..data") / name)

    def publish(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.version += 1
        folder = self.root / f"..v{self.version}"
        folder.mkdir()
        (folder / "tls.crt").write_bytes(cert_pem)
        (folder / "tls.key").write_bytes(key_pem)
        staging = self.root / "..data_tmp"
        staging.symlink_to(folder.name)
        staging.replace(self.root / "..data")

    @property
    def cert_file(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.root / "tls.key"


def _served_name(port: int) -> str:
    """Common name of the certificate the bridge presents in a real STARTTLS handshake."""
    with Raw(port) as raw:
        raw.command("EHLO client.test")
        raw.starttls()
        der = raw.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert raw.command("NOOP").startswith("250")
    assert der is not None
    name = x509.load_der_x509_certificate(der).subject
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    secret = SecretVolume(tmp_path)
    secret.publish(*tls.self_signed("one.test"))
    return secret


def test_a_rotated_secret_is_served_without_a_restart(
    volume: SecretVolume,
    receiver: ReceiverThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailbridge.tls")
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        tls={
            "cert_file": str(volume.cert_file),
            "key_file": str(volume.key_file),
            "reload_check_seconds": 0,  # check at every handshake
        },
    ) as bridge:
        assert "one.test" == _served_name(bridge.smtp_port)
        volume.publish(*tls.self_signed("two.test"))
        assert "two.test" == _served_name(bridge.smtp_port)
        # A half-rotated pair (key of another certificate) is refused; the last good one stays.
        three_cert, _ = tls.self_signed("three.test")
        _, other_key = tls.self_signed("other.test")
        volume.publish(three_cert, other_key)
        assert "two.test" == _served_name(bridge.smtp_port)
        # Once the pair is whole, it is picked up.
        three_cert, three_key = tls.self_signed("three.test")
        volume.publish(three_cert, three_key)
        assert "three.test" == _served_name(bridge.smtp_port)
        still_serves(bridge.smtp_port)
    messages = [r.getMessage() for r in caplog.records if r.name == "mailbridge.tls"]
    assert 2 == messages.count("TLS certificate reloaded")
    assert any("cannot be loaded" in m for m in messages)
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)


def test_files_are_checked_at_most_once_per_interval(volume: SecretVolume) -> None:
    now = [100.0]
    settings = TlsSettings(cert_file=volume.cert_file, key_file=volume.key_file)
    context = tls.server_context(
        settings, "mx.test", check_interval_seconds=10, clock=lambda: now[0]
    )
    assert context is not None
    files = context.sni_callback.__self__  # type: ignore[union-attr]
    assert isinstance(files, tls.CertificateFiles)
    first = files.current()
    volume.publish(*tls.self_signed("two.test"))
    now[0] += 9.9
    assert first is files.current()  # not yet due
    now[0] += 0.1
    second = files.current()
    assert second is not first
    assert 1 == files.reloads
    now[0] += 60
    assert second is files.current()  # unchanged files are not reloaded
    assert 1 == files.reloads


def test_files_that_cannot_be_used_at_start_stop_the_bridge_with_a_clear_error(
    tmp_path: Path,
) -> None:
    missing = TlsSettings(cert_file=tmp_path / "nope.crt", key_file=tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=r"tls\.cert_file: no such file"):
        tls.server_context(missing, "mx.test")
    (tmp_path / "bad.crt").write_text("not a certificate")
    (tmp_path / "bad.key").write_text("not a key")
    broken = TlsSettings(cert_file=tmp_path / "bad.crt", key_file=tmp_path / "bad.key")
    with pytest.raises(ConfigError, match="cannot load"):
        tls.server_context(broken, "mx.test")


def test_the_context_refuses_old_protocols_and_weak_ciphers() -> None:
    context = tls.server_context(TlsSettings(), "mx.test")
    assert context is not None
    assert context.minimum_version >= tls.ssl.TLSVersion.TLSv1_2
    assert context.options & tls.ssl.OP_NO_COMPRESSION
    assert context.verify_mode == tls.ssl.CERT_NONE
    names = {cipher["name"] for cipher in context.get_ciphers()}
    for weak in ("RC4", "DES-CBC3", "NULL", "EXPORT", "ADH", "AECDH", "MD5"):
        assert not [name for name in names if weak in name], weak
