"""Fixtures for the Helm chart and container image tests.

Real tools only: ``helm`` and ``kubectl`` from scripts/setup (``.tools/bin``),
``hadolint`` and ``kubernetes-validate`` from the test extras. A missing tool
fails the test (:func:`tests.conftest.require_tool`), never skips it.

Kubernetes clients read ``$KUBECONFIG`` (some at import time), so it points at
a file that does not exist before anything imports them, as in
``tests/operator/conftest.py``; Helm gets temporary cache/config/data homes and
kubectl its own discovery cache per test. The emulated API server is the
operator tests' layer (``tests/operator/emulator.py``), imported from there.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

_SANDBOX = pathlib.Path(tempfile.mkdtemp(prefix="mailbridge-chart-tests-"))
os.environ["KUBECONFIG"] = str(_SANDBOX / "no-cluster-kubeconfig")
os.environ["KUBECACHEDIR"] = str(_SANDBOX / "kube-cache")

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "operator"))  # the emulator layer (not a package)

import emulator  # noqa: E402  (only after KUBECONFIG points nowhere)
from crdschema import CrdSchema  # noqa: E402

from tests.conftest import require_tool  # noqa: E402

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


@pytest.fixture(scope="session")
def helm() -> Helm:
    return Helm(_SANDBOX / "helm")


@pytest.fixture(scope="session")
def crd() -> CrdSchema:
    """The MailBridge CRD's schema, to validate MailBridges as the API server would."""
    return CrdSchema.load(CRD_PATH)


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    """Every scenario rendered once, on a cluster that serves the monitoring APIs."""
    api_versions = [arg for api in MONITORING_APIS for arg in ("--api-versions", api)]
    return {name: helm.template(*api_versions, values=name) for name in SCENARIOS}


@pytest.fixture(autouse=True)
def _kube_environment(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig-unset"))
    monkeypatch.setenv("KUBECACHEDIR", str(tmp_path / "kube-cache"))
    for name in list(os.environ):
        if name.startswith("MAILBRIDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[emulator.Cluster]:
    """An empty emulated Kubernetes API on 127.0.0.1 (helm installs the CRD itself)."""
    require_tool("kubectl")
    with emulator.Cluster.start(tmp_path / "cluster") as handle:
        monkeypatch.setenv("KUBECONFIG", str(handle.kubeconfig))
        monkeypatch.setenv("KUBECACHEDIR", str(handle.directory / "kube-cache"))
        yield handle
        errors = handle.server_errors()
        assert [] == errors, f"the emulator failed while serving: {errors!r}"


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert 1 == len(found), f"expected one {kind}, got {len(found)}"
    return found[0]
