"""mailbridge-operator: its command line, its health endpoint and its own metrics."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import urllib.request

import pytest
from emulator import Cluster, OperatorProcess

from mailbridge_operator import cli, model

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
        "MAILBRIDGE_OPERATOR_BRIDGE_IMAGE",
        model.DEFAULT_IMAGE,
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


@pytest.mark.parametrize(
    ("environ", "image"),
    [
        ({}, model.DEFAULT_IMAGE),
        ({"MAILBRIDGE_OPERATOR_BRIDGE_IMAGE": ""}, model.DEFAULT_IMAGE),
        ({"MAILBRIDGE_OPERATOR_BRIDGE_IMAGE": "mirror.example/mb:2"}, "mirror.example/mb:2"),
        ({"MAILBRIDGE_OPERATOR_BRIDGE_IMAGE": "mb@sha256:" + "a" * 64}, "mb@sha256:" + "a" * 64),
    ],
)
def test_the_bridges_default_image_comes_from_the_environment(
    environ: dict[str, str], image: str
) -> None:
    assert image == cli.bridge_image(environ)


@pytest.mark.parametrize("value", ["mirror.example/mb:2 --debug", " ", "x" * 513])
def test_a_bridge_image_that_is_no_reference_stops_the_operator(value: str) -> None:
    with pytest.raises(ValueError, match="MAILBRIDGE_OPERATOR_BRIDGE_IMAGE"):
        cli.bridge_image({"MAILBRIDGE_OPERATOR_BRIDGE_IMAGE": value})
    executable = pathlib.Path(sys.executable).parent / "mailbridge-operator"
    result = subprocess.run(
        [str(executable)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=os.environ | {"MAILBRIDGE_OPERATOR_BRIDGE_IMAGE": value},
    )
    assert 2 == result.returncode
    assert "is not an image reference" in result.stderr


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
        assert "resync" in json.loads(response.read())  # the probe of the resync task
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
