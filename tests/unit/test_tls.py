"""STARTTLS contexts: self-signed with the right names, files loaded, TLS 1.2 minimum."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from mailbridge.config import ConfigError, TlsSettings
from mailbridge.smtp import tls


def test_self_signed_certificate_names_the_host_and_localhost() -> None:
    cert_pem, key_pem = tls.self_signed("mx.example.com")
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ["mx.example.com", "localhost"] == names.get_values_for_type(x509.DNSName)
    assert [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")] == (
        names.get_values_for_type(x509.IPAddress)
    )
    assert b"PRIVATE KEY" in key_pem


def test_context_defaults_to_tls_1_2_minimum_and_no_compression() -> None:
    context = tls.server_context(TlsSettings(), "mx.test")
    assert context is not None
    assert ssl.TLSVersion.TLSv1_2 == context.minimum_version
    assert context.options & ssl.OP_NO_COMPRESSION


def test_tls_can_be_disabled_and_raised_to_1_3() -> None:
    assert tls.server_context(TlsSettings(enabled=False), "mx.test") is None
    context = tls.server_context(TlsSettings(min_version="TLSv1.3"), "mx.test")
    assert context is not None and ssl.TLSVersion.TLSv1_3 == context.minimum_version


def test_certificate_files_are_loaded(tmp_path: Path) -> None:
    cert_pem, key_pem = tls.self_signed("files.test")
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    settings = TlsSettings(cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key")
    assert tls.server_context(settings, "mx.test") is not None


def test_mismatched_or_missing_files_are_config_errors(tmp_path: Path) -> None:
    cert_pem, _ = tls.self_signed("a.test")
    _, other_key = tls.self_signed("b.test")
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(other_key)
    settings = TlsSettings(cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key")
    with pytest.raises(ConfigError, match="cannot load"):
        tls.server_context(settings, "mx.test")
    missing = TlsSettings(cert_file=tmp_path / "nope.crt", key_file=tmp_path / "tls.key")
    with pytest.raises(ConfigError, match=r"tls\.cert_file: no such file"):
        tls.server_context(missing, "mx.test")
