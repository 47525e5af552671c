"""Shared fixtures. Tests needing external binaries call :func:`require_tool`:
scripts/setup installs them, so a missing one is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "bin"


def require_tool(name: str) -> str:
    """Absolute path of ``name`` (in .tools/bin or on PATH), or fail the test."""
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run scripts/setup (it installs every test tool)")
    return found
