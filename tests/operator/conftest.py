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
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from crdschema import CrdSchema

_SANDBOX = pathlib.Path(tempfile.mkdtemp(prefix="mailbridge-operator-tests-"))
os.environ["KUBECONFIG"] = str(_SANDBOX / "no-cluster-kubeconfig")
os.environ["KUBECACHEDIR"] = str(_SANDBOX / "kube-cache")

import emulator  # noqa: E402  (only after KUBECONFIG points nowhere)

from mailbridge_operator import rbac  # noqa: E402

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


@pytest.fixture
def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[emulator.Cluster]:
    """An emulated Kubernetes API on 127.0.0.1 with the MailBridge CRD; KUBECONFIG points to it.

    Reusable by any test that needs an API server (the Helm chart tests too): the handle
    has ``kubeconfig``, ``url``, ``kubectl()``, ``get()``, ``wait_for()`` and ``emulator``.
    """
    with emulator.Cluster.start(tmp_path / "cluster") as handle:
        monkeypatch.setenv("KUBECONFIG", str(handle.kubeconfig))
        monkeypatch.setenv("KUBECACHEDIR", str(handle.directory / "kube-cache"))
        handle.apply_file(CRD_PATH)
        yield handle
        errors = handle.server_errors()
        assert [] == errors, f"the emulator failed while serving: {errors!r}"


@pytest.fixture
def start_operator(
    cluster: emulator.Cluster, tmp_path: pathlib.Path
) -> Iterator[Callable[..., emulator.OperatorProcess]]:
    """Start the real ``mailbridge-operator`` (a subprocess) with extra arguments (and
    extra environment variables: ``env=``).

    At the end: each process started here gets SIGTERM (by its PID), must exit 0, and
    every request it made must be allowed by ``rbac.RULES``.
    """
    started: list[emulator.OperatorProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> emulator.OperatorProcess:
        process = emulator.OperatorProcess(
            cluster, tmp_path / f"operator-{len(started)}.log", *args, env=env
        )
        started.append(process)
        process.wait_started()
        return process

    yield start
    codes = []
    for process in started:
        codes.append(process.stop())
        print(f"--- operator log (exit {codes[-1]}) ---\n{process.log(200)}")
    assert all(code == 0 for code in codes), f"the operator did not stop cleanly: {codes}"
    refused = sorted(
        {
            f"{call.verb} {call.api_group or 'core'}/{call.resource}"
            for call in cluster.resource_requests(*emulator.OPERATOR_AGENTS)
            if not rbac.allows(*call.permission)
        }
    )
    assert [] == refused, "the operator used permissions rbac.RULES does not grant"


@pytest.fixture
def operator(
    start_operator: Callable[..., emulator.OperatorProcess],
) -> emulator.OperatorProcess:
    """The real ``mailbridge-operator`` watching every namespace of the emulated cluster."""
    return start_operator("--all-namespaces")
