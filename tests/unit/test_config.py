"""Settings: env, .env and YAML sources; the shorthand; clear errors; redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mailbridge import config
from mailbridge.delivery import signing

SECRET = signing.new_secret()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MAILBRIDGE_* from the outside, and no stray .env in the working directory."""
    import os

    for key in list(os.environ):
        if key.startswith("MAILBRIDGE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_no_configuration_means_demo_on_loopback() -> None:
    settings = config.load()
    assert settings.demo_mode
    assert ("127.0.0.1", 2525) == (settings.smtp.host, settings.smtp.port)
    assert 25 * 1024 * 1024 == settings.smtp.max_message_size_bytes
    assert "sync" == settings.delivery.mode


def test_shorthand_becomes_the_default_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBRIDGE_WEBHOOK_URL", "https://hooks.example.com/in")
    monkeypatch.setenv("MAILBRIDGE_TARGET_EMAILS", "alerts@example.com, *@ops.example.com")
    monkeypatch.setenv("MAILBRIDGE_WEBHOOK_SECRET", SECRET)
    settings = config.load()
    [route] = settings.routes
    assert "default" == route.name
    assert ["alerts@example.com", "*@ops.example.com"] == route.recipients
    assert "https://hooks.example.com/in" == str(route.webhook.url)
    assert [SECRET] == [s.get_secret_value() for s in route.webhook.secrets]
    assert not settings.demo_mode


def test_nested_env_variables_set_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBRIDGE_SMTP__PORT", "2600")
    monkeypatch.setenv("MAILBRIDGE_SMTP__REQUIRE_TLS", "true")
    monkeypatch.setenv("MAILBRIDGE_PARSING__HEADER_PREFIXES", "X-, List-")
    monkeypatch.setenv("MAILBRIDGE_DELIVERY__PERMANENT_STATUSES", "400,410")
    settings = config.load()
    assert (2600, True) == (settings.smtp.port, settings.smtp.require_tls)
    assert ["X-", "List-"] == settings.parsing.header_prefixes
    assert [400, 410] == settings.delivery.permanent_statuses


def test_yaml_file_holds_routes_and_env_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret_file = tmp_path / "billing.secret"
    secret_file.write_text(SECRET + "\n")
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {
                "smtp": {"port": 2700, "hostname": "mx.example.com"},
                "routes": [
                    {
                        "name": "billing",
                        "recipients": ["billing@example.com"],
                        "webhook": {
                            "url": "https://billing.example.com/hook",
                            "secret_files": [str(secret_file)],
                            "headers": {"Authorization": "Bearer t"},
                        },
                    },
                    {
                        "name": "support",
                        "recipients": ["*@support.example.com"],
                        "webhook": {"url": "http://127.0.0.1:9000/"},
                    },
                ],
            }
        )
    )
    monkeypatch.setenv("MAILBRIDGE_CONFIG", str(routes))
    monkeypatch.setenv("MAILBRIDGE_SMTP__PORT", "2800")
    settings = config.load()
    assert ["billing", "support"] == [r.name for r in settings.routes]
    assert (2800, "mx.example.com") == (settings.smtp.port, settings.smtp.hostname)
    assert [secret_file] == settings.routes[0].webhook.secret_files


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAILBRIDGE_SMTP__PORT=2900\n")
    assert 2900 == config.load().smtp.port


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MAILBRIDGE_SMTP__PORT": "70000"}, "smtp.port: Input should be less than or equal"),
        ({"MAILBRIDGE_SMTP__PORT": "many"}, "smtp.port: Input should be a valid integer"),
        ({"MAILBRIDGE_SMTP__MAX_RECIPIENTS": "0"}, "smtp.max_recipients"),
        ({"MAILBRIDGE_WEBHOOK_URL": "ftp://x"}, "webhook_url: URL scheme should be 'http' or"),
        ({"MAILBRIDGE_WEBHOOK_URL": "http://x.test"}, "webhook_url is set but target_emails"),
        (
            {"MAILBRIDGE_WEBHOOK_URL": "http://x.test", "MAILBRIDGE_TARGET_EMAILS": "a@[1.2.3.4]"},
            "not a valid pattern",
        ),
        (
            {
                "MAILBRIDGE_WEBHOOK_URL": "http://x.test",
                "MAILBRIDGE_TARGET_EMAILS": "a@b.com",
                "MAILBRIDGE_WEBHOOK_SECRET": "too-short",
            },
            "signing secret must be base64",
        ),
        ({"MAILBRIDGE_DELIVERY__PERMANENT_STATUSES": "503"}, "503 cannot be permanent"),
        ({"MAILBRIDGE_DELIVERY__MODE": "fast"}, "delivery.mode: Input should be 'sync' or"),
        ({"MAILBRIDGE_TLS__CERT_FILE": "/x.crt"}, "cert_file and key_file must be given together"),
        ({"MAILBRIDGE_SMTP__NO_SUCH": "1"}, "smtp.no_such: Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_name_the_field_and_value(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(config.ConfigError) as raised:
        config.load()
    assert expected in str(raised.value)


def test_a_bad_secret_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBRIDGE_WEBHOOK_URL", "http://x.test")
    monkeypatch.setenv("MAILBRIDGE_TARGET_EMAILS", "a@b.com")
    monkeypatch.setenv("MAILBRIDGE_WEBHOOK_SECRET", "not base64 but private!")
    with pytest.raises(config.ConfigError) as raised:
        config.load()
    assert "private" not in str(raised.value)
    assert "<redacted>" in str(raised.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("routes: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("routes:\n  - name: Bad Name\n", "routes.0.name"),
    ],
)
def test_bad_yaml_files_are_clear(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    monkeypatch.setenv("MAILBRIDGE_CONFIG", str(path))
    with pytest.raises(config.ConfigError, match=expected):
        config.load()


def test_missing_yaml_file_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAILBRIDGE_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load()


def test_duplicate_route_names_are_refused() -> None:
    route = {"name": "a", "recipients": ["*"], "webhook": {"url": "http://x.test"}}
    with pytest.raises(config.ConfigError, match="repeated: a"):
        config.load(routes=[route, route])


def test_to_yaml_redacts_secrets_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBRIDGE_WEBHOOK_URL", "http://x.test/h")
    monkeypatch.setenv("MAILBRIDGE_TARGET_EMAILS", "a@b.com")
    monkeypatch.setenv("MAILBRIDGE_WEBHOOK_SECRET", SECRET)
    settings = config.load()
    text = config.to_yaml(settings)
    assert SECRET not in text
    assert "**********" in text
    revealed = config.to_yaml(settings, reveal_secrets=True)
    monkeypatch.delenv("MAILBRIDGE_WEBHOOK_URL")
    monkeypatch.delenv("MAILBRIDGE_TARGET_EMAILS")
    monkeypatch.delenv("MAILBRIDGE_WEBHOOK_SECRET")
    again = config.Settings.model_validate(yaml.safe_load(revealed))
    assert settings.model_dump(mode="json") == again.model_dump(mode="json")


def test_from_mapping_ignores_the_environment_and_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MAILBRIDGE_SMTP__PORT", "2999")
    (tmp_path / ".env").write_text("MAILBRIDGE_SMTP__HOSTNAME=from-dotenv\n")
    settings = config.from_mapping({"smtp": {"hostname": "given"}})
    assert (2525, "given") == (settings.smtp.port, settings.smtp.hostname)
    assert 2999 == config.load().smtp.port  # while load() reads both


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://u:pw@hooks.test/a?token=t&x=1",
            "https://u:<redacted>@hooks.test/a?token=<redacted>&x=<redacted>",
        ),
        ("http://hooks.test/plain", "http://hooks.test/plain"),
        ("http://user@hooks.test/", "http://user@hooks.test/"),
    ],
)
def test_redact_url_hides_passwords_and_query_values(url: str, expected: str) -> None:
    assert expected == config.redact_url(url)


def test_display_yaml_hides_url_credentials_and_header_values_but_the_file_keeps_them() -> None:
    route = {
        "name": "r",
        "recipients": ["*"],
        "webhook": {
            "url": "https://u:pw@h.test/x?token=t",
            "headers": {"Authorization": "Bearer t0"},
        },
    }
    settings = config.from_mapping({"routes": [route]})
    shown = config.to_yaml(settings, for_display=True)
    assert "pw" not in shown and "t0" not in shown and "token=t" not in shown
    kept = config.to_yaml(settings)  # what the operator writes into the ConfigMap
    assert "https://u:pw@h.test/x?token=t" in kept and "Bearer t0" in kept
