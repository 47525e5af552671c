"""Play the parts of a cluster the emulator leaves out, for a chart installed into it.

The emulated API server (``tests/operator/emulator.py``) runs no controllers
and no kubelet, so:

- :class:`Rollout` plays the Deployment controller while ``helm install/upgrade
  --wait`` waits: it marks each Deployment of a namespace rolled out and
  Available (the conditions kstatus reads) whenever its generation is new.
- :class:`InstalledOperator` runs the real ``mailbridge-operator`` as the
  chart's Deployment says (its command and arguments, as stored in the API),
  with every ``--*-address`` moved to a free port on 127.0.0.1.
- :func:`run_test_pods` plays the kubelet for ``helm test``: it runs each test
  Pod's command here, with the in-cluster Service URL resolved to the operator
  process behind it (Service → targetPort → container port → local port), and
  writes the Pod's phase.
- :func:`refused_requests` is the RBAC authorizer: which requests a client
  made that the installed ClusterRoles/Roles, through their bindings to the
  operator's ServiceAccount, do not allow.

Starts only its own processes and stops them by their handle.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import emulator

from mailbridge_operator import cli

Obj = dict[str, Any]
DEPLOYMENTS = "apps/v1/deployments"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Rollout:
    """A thread that marks every Deployment in ``namespace`` rolled out, until stopped."""

    def __init__(self, cluster: emulator.Cluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
        self.marked: list[tuple[str, int]] = []

    def __enter__(self) -> Rollout:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for deployment in self.cluster.objects_of(DEPLOYMENTS, self.namespace):
                generation = deployment["metadata"].get("generation", 1)
                if (deployment.get("status") or {}).get("observedGeneration") != generation:
                    self._mark(deployment, generation)

    def _mark(self, deployment: Obj, generation: int) -> None:
        replicas = deployment["spec"].get("replicas", 1)
        status = {
            "observedGeneration": generation,
            "replicas": replicas,
            "readyReplicas": replicas,
            "updatedReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ],
        }
        name = deployment["metadata"]["name"]
        self.cluster.kubectl(
            "patch",
            "deployment",
            name,
            "-n",
            self.namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
        self.marked.append((name, generation))


class InstalledOperator(emulator.RunningOperator):
    """``mailbridge-operator`` run with the command and arguments of an installed Deployment."""

    def __init__(self, cluster: emulator.Cluster, deployment: Obj, log: pathlib.Path) -> None:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        self.cluster = cluster
        self.container = container
        self.ports: dict[int, int] = {}  # container port → local port
        address_options = {
            option
            for action in cli.build_parser()._actions
            for option in action.option_strings
            if option.endswith("-address")
        }
        args = []
        for arg in container["args"]:
            option, _, value = arg.partition("=")
            if option in address_options:
                local = free_port()
                self.ports[int(value.rpartition(":")[2])] = local
                arg = f"{option}=127.0.0.1:{local}"
                address_options.discard(option)
            args.append(arg)
        for option in sorted(address_options):  # never bind the defaults (0.0.0.0) in a test
            args.append(f"{option}=127.0.0.1:{free_port()}")
        self.args = args
        bin_dir = pathlib.Path(sys.executable).parent
        command = [str(bin_dir / container["command"][0]), *args]
        env = cluster.env() | {
            e["name"]: e["value"] for e in container.get("env", []) if "value" in e
        }
        self.log_path = log
        self._log = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cluster.directory
        )

    def port(self, name: str) -> int:
        """The local port of the container port called ``name``."""
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        return self.ports[ports[name]]


def _resolve(cluster: emulator.Cluster, url: str, operator: InstalledOperator) -> str:
    """Cluster DNS and kube-proxy for ``http://<service>.<namespace>.svc:<port>/...``."""
    match = re.fullmatch(r"http://([^.]+)\.([^.]+)\.svc:(\d+)(/.*)", url)
    assert match, f"not an in-cluster Service URL: {url}"
    name, namespace, port, path = match.groups()
    service = cluster.get("v1/services", namespace, name)
    assert service is not None, f"no Service {namespace}/{name} for {url}"
    (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert any(
        service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        for d in cluster.objects_of(DEPLOYMENTS, namespace)
    ), f"Service {name} selects no Deployment's pods"
    return f"http://127.0.0.1:{operator.port(target)}{path}"


def run_test_pods(
    cluster: emulator.Cluster,
    namespace: str,
    operator: InstalledOperator,
    helm_test: subprocess.Popen[str],
    timeout: float = 60,
) -> list[tuple[str, int, str]]:
    """Play the kubelet for the test Pods ``helm test`` creates; returns (pod, exit, output)."""
    ran: list[tuple[str, int, str]] = []
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while helm_test.poll() is None and time.monotonic() < deadline:
        for pod in cluster.objects_of("v1/pods", namespace):
            uid = pod["metadata"]["uid"]
            if uid in done:
                continue
            done.add(uid)
            (container,) = pod["spec"]["containers"]
            command = [*container["command"], *container.get("args", [])]
            assert "python" == command[0]
            command = [sys.executable, *command[1:-1], _resolve(cluster, command[-1], operator)]
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=70,
                check=False,
                env={"PATH": os.environ["PATH"]},
            )
            phase = "Succeeded" if result.returncode == 0 else "Failed"
            cluster.kubectl(
                "patch",
                "pod",
                pod["metadata"]["name"],
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                json.dumps({"status": {"phase": phase}}),
            )
            ran.append((pod["metadata"]["name"], result.returncode, result.stdout + result.stderr))
        time.sleep(0.1)
    return ran


def _allows(rules: Iterable[Obj], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.get("apiGroups", [])
        and resource in rule.get("resources", [])
        and verb in rule.get("verbs", [])
        for rule in rules
    )


def refused_requests(
    cluster: emulator.Cluster,
    account_namespace: str,
    account: str,
    user_agents: tuple[str, ...] = ("kopf/", "mailbridge-operator"),
    *,
    with_roles: bool = True,
) -> list[str]:
    """Requests of the operator that the installed RBAC does not allow its ServiceAccount
    (``with_roles=False``: counting its ClusterRoleBindings only)."""
    rbac = "rbac.authorization.k8s.io/v1/"
    subject = {"kind": "ServiceAccount", "name": account, "namespace": account_namespace}
    cluster_roles = {r["metadata"]["name"]: r for r in cluster.objects_of(rbac + "clusterroles")}
    namespaced_roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r
        for r in cluster.objects_of(rbac + "roles")
    }
    cluster_rules = [
        rule
        for binding in cluster.objects_of(rbac + "clusterrolebindings")
        if subject in binding.get("subjects", [])
        for rule in cluster_roles[binding["roleRef"]["name"]].get("rules", [])
    ]
    namespace_rules: dict[str, list[Obj]] = {}
    for binding in cluster.objects_of(rbac + "rolebindings") if with_roles else []:
        if subject not in binding.get("subjects", []):
            continue
        namespace = binding["metadata"]["namespace"]
        ref = binding["roleRef"]
        role = (
            cluster_roles[ref["name"]]
            if ref["kind"] == "ClusterRole"
            else namespaced_roles[(namespace, ref["name"])]
        )
        namespace_rules.setdefault(namespace, []).extend(role.get("rules", []))
    refused = set()
    for request in cluster.resource_requests(*user_agents):
        group, resource, verb = request.permission
        match = re.search(r"/namespaces/([^/]+)/", request.path)
        namespace = match.group(1) if match else None
        rules = cluster_rules + (namespace_rules.get(namespace, []) if namespace else [])
        if not _allows(rules, group, resource, verb):
            refused.add(f"{verb} {group or 'core'}/{resource} in {namespace or '(cluster)'}")
    return sorted(refused)
