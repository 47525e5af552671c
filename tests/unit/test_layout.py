"""The repository's layout keeps the suite collectable in one run."""

from __future__ import annotations

from collections import Counter

from tests.conftest import ROOT


def test_test_modules_have_unique_basenames() -> None:
    """pytest's default import mode cannot collect two test modules of one name."""
    names = Counter(path.name for path in (ROOT / "tests").rglob("test_*.py"))
    assert [] == sorted(name for name, count in names.items() if count > 1)


def test_no_top_level_operator_package_shadows_the_standard_module() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
