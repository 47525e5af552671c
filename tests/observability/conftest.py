"""Fixtures for the observability tests: the real promtool binary.

A missing binary fails the tests (``scripts/setup`` installs it); it never
skips them.
"""

from __future__ import annotations

import shutil

import pytest


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: run scripts/setup (Debian package 'prometheus')")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")
