"""Shared fixtures. Tests needing external binaries call :func:`require_tool`:
scripts/setup installs them, so a missing one is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Spans finished during this test. The tracer provider installed for it is removed
    afterwards (OpenTelemetry's global can be set only once, so it is reset), so later
    tests see no tracing and the order of tests cannot change what they observe."""
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    installed = not isinstance(provider, TracerProvider)
    if installed:
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()
    if installed:
        provider.shutdown()
        trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
        trace._TRACER_PROVIDER_SET_ONCE = trace.Once()  # type: ignore[attr-defined]
