"""Fixtures for the operator's tests.

Kubernetes clients (kopf, kubectl, the ``kubernetes`` packages) read
``$KUBECONFIG`` — some at import time — so it is pointed at a file that does
not exist *before* anything imports them: no test can ever reach a real
cluster. Each test then gets its own ``KUBECONFIG`` and ``KUBECACHEDIR`` (kubectl
caches discovery per host:port, and ports are reused).

``cluster`` (see :mod:`emulator`) starts an emulated API server on loopback and
yields a handle with the kubeconfig path; ``operator`` runs the real
``mailbridge-operator`` against it.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import pytest
import yaml
from crdschema import CrdSchema

_SANDBOX = pathlib.Path(tempfile.mkdtemp(prefix="mailbridge-operator-tests-"))
os.environ["KUBECONFIG"] = str(_SANDBOX / "no-cluster-kubeconfig")
os.environ["KUBECACHEDIR"] = str(_SANDBOX / "kube-cache")

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "charts" / "mailbridge" / "crds" / "mailbridges.mailbridge.io.yaml"
EXAMPLE_PATH = ROOT / "examples" / "mailbridge.yaml"


@pytest.fixture(autouse=True)
def _kube_environment(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig-unset"))
    monkeypatch.setenv("KUBECACHEDIR", str(tmp_path / "kube-cache"))
    for name in list(os.environ):
        if name.startswith("MAILBRIDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def crd() -> CrdSchema:
    """The MailBridge CRD's schema, ready to validate resources as the API server would."""
    return CrdSchema.load(CRD_PATH)


@pytest.fixture
def example() -> dict[str, Any]:
    """The MailBridge of examples/mailbridge.yaml (a fresh copy per test)."""
    documents = list(yaml.safe_load_all(EXAMPLE_PATH.read_text(encoding="utf-8")))
    return next(d for d in documents if d["kind"] == "MailBridge")
