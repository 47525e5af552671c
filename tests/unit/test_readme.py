"""The README documents every setting exactly as the settings model defines it."""

from __future__ import annotations

from mailbridge import config
from tests.conftest import ROOT


def test_settings_table_matches_the_model() -> None:
    text = (ROOT / "README.md").read_text()
    begin = text.index("\n", text.index("<!-- settings:begin")) + 1
    end = text.index("<!-- settings:end -->")
    assert config.reference_markdown() == text[begin:end], (
        "README settings table is stale: regenerate it from config.reference_markdown()"
    )


def test_readme_names_the_two_commands_and_ci_runs_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo" in readme and "scripts/test" in readme
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text()
