"""mailbridge-operator: its command line, its health endpoint and its own metrics."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import urllib.request

import pytest
from emulator import Cluster, OperatorProcess

pytestmark = pytest.mark.timeout(60)

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "mailbridge.yaml"


def test_help_describes_the_options() -> None:
    executable = pathlib.Path(sys.executable).parent / "mailbridge-operator"
    result = subprocess.run(
        [str(executable), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert 0 == result.returncode, result.stderr
    for option in (
        "--namespace",
        "--all-namespaces",
        "--health-address",
        "--metrics-address",
        "--resync-interval",
        "--peering",
    ):
        assert option in result.stdout


def test_bad_arguments_exit_with_usage() -> None:
    executable = pathlib.Path(sys.executable).parent / "mailbridge-operator"
    result = subprocess.run(
        [str(executable), "-n", "a", "--all-namespaces"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 2 == result.returncode
    assert "not allowed with argument" in result.stderr


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf"])
def test_a_resync_interval_must_be_a_positive_number_of_seconds(value: str) -> None:
    executable = pathlib.Path(sys.executable).parent / "mailbridge-operator"
    result = subprocess.run(
        [str(executable), f"--resync-interval={value}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 2 == result.returncode
    assert "--resync-interval" in result.stderr


def test_health_and_metrics_endpoints(cluster: Cluster, operator: OperatorProcess) -> None:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5
    ) as response:
        assert 200 == response.status
        json.loads(response.read())
    cluster.apply_file(EXAMPLE)
    cluster.wait_for(
        lambda: cluster.get("apps/v1/deployments", "default", "inbound"),
        what="the Deployment",
        details=operator.log,
    )

    def metrics() -> str:
        url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    text = cluster.wait_for(
        lambda: 'outcome="waiting"} 0.0' not in metrics() and metrics(),
        what="a reconciliation counted",
        details=operator.log,
    )
    assert 'mailbridge_operator_child_changes_total{action="Created",kind="Deployment"} 1.0' in text
    assert 'mailbridge_operator_reconciliations_total{outcome="invalid"} 0.0' in text
    assert "mailbridge_operator_reconcile_duration_seconds_count" in text
