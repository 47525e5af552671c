"""What the chart tests share besides fixtures: the chart's paths, its scenarios and helm.

Test modules import these from here, never from ``conftest``: each test
directory has a ``conftest.py`` outside any package, so in one pytest session
with other directories (``pytest tests/operator tests/charts tests/observability``)
the module named ``conftest`` is whichever directory's was loaded last.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from typing import Any

import yaml

from tests.conftest import require_tool

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mailbridge"
CRD_PATH = CHART / "crds" / "mailbridges.mailbridge.io.yaml"
VALUES_DIR = pathlib.Path(__file__).resolve().parent / "values"
EXAMPLE_PATH = ROOT / "examples" / "mailbridge.yaml"
MONITORING_APIS = (
    "monitoring.coreos.com/v1/PrometheusRule",
    "monitoring.coreos.com/v1/ServiceMonitor",
)
# Values files of tests/charts/values, rendered and validated one by one; "defaults"
# is the chart's values.yaml alone.
SCENARIOS = ("defaults", "namespaced", "monitoring", "bridges")


class Helm:
    """The real helm binary with private cache/config/data homes."""

    def __init__(self, home: pathlib.Path) -> None:
        self.binary = require_tool("helm")
        self.env = os.environ | {
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            env=self.env | (env or {}),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def template(
        self, *args: str, values: str = "defaults", release: str = "mb", namespace: str = "mail"
    ) -> list[dict[str, Any]]:
        """The chart rendered with a scenario's values file, as a list of manifests."""
        files = [] if values == "defaults" else ["-f", str(VALUES_DIR / f"{values}.yaml")]
        result = self.run("template", release, str(CHART), "--namespace", namespace, *files, *args)
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert 1 == len(found), f"expected one {kind}, got {len(found)}"
    return found[0]
