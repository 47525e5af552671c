"""Fixtures for the Helm chart and container image tests (shared paths and helm: ``chart_tools``).

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
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

_SANDBOX = pathlib.Path(tempfile.mkdtemp(prefix="mailbridge-chart-tests-"))
os.environ["KUBECONFIG"] = str(_SANDBOX / "no-cluster-kubeconfig")
os.environ["KUBECACHEDIR"] = str(_SANDBOX / "kube-cache")

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "operator"))  # the emulator layer (not a package)

import emulator  # noqa: E402  (only after KUBECONFIG points nowhere)
from chart_tools import CRD_PATH, MONITORING_APIS, SCENARIOS, Helm  # noqa: E402
from crdschema import CrdSchema  # noqa: E402

from tests.conftest import require_tool  # noqa: E402


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
