"""``mailbridge-operator``: run the MailBridge operator (kopf) until SIGTERM.

Watches MailBridges in every namespace (the default) or in the namespaces
given with ``--namespace``. Serves kopf's liveness endpoint (``/healthz``,
JSON of the probes) for the pod's livenessProbe, and its own Prometheus
``/metrics`` (:mod:`mailbridge_operator.metrics`). Credentials: the pod's
service account in a cluster, else ``$KUBECONFIG``. Runs standalone (one
replica) unless ``--peering`` names a kopf peering object, which needs kopf's
peering CRDs and lets several replicas take turns (kopf pauses its watchers on
the replicas whose turn it is not; the periodic resync, ``--resync-interval``,
is the operator's own task and keeps running there).

Reads the environment only when run (``$KUBECONFIG``), never at import.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import kopf

from mailbridge_operator import resync


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailbridge-operator",
        description="Run the MailBridge operator: turn MailBridge resources into running bridges.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="watch this namespace (repeatable; globs like team-* work); default: all",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch MailBridges in every namespace (the default)",
    )
    parser.add_argument(
        "--health-address",
        default="0.0.0.0:8081",
        metavar="HOST:PORT",
        help="where to serve the liveness endpoint /healthz (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-address",
        default="0.0.0.0:8082",
        metavar="HOST:PORT",
        help="where to serve Prometheus /metrics; empty to disable (default: %(default)s)",
    )
    parser.add_argument(
        "--resync-interval",
        type=_positive_seconds,
        default=resync.DEFAULT_INTERVAL_SECONDS,
        metavar="SECONDS",
        help="reconcile each MailBridge at least this often, even when nothing signals "
        "a change (default: %(default)g)",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        help="coordinate several operator replicas through this kopf peering object "
        "(it pauses kopf's watchers, not the resync)",
    )
    parser.add_argument("--verbose", action="store_true", help="log handler details")
    parser.add_argument("--debug", action="store_true", help="log every API request")
    parser.add_argument(
        "--log-format",
        choices=("json", "plain", "full"),
        default="json",
        help="json: one object per line (default); plain/full: for humans",
    )
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Importing registers the handlers in kopf's default registry.
    from mailbridge_operator import handlers  # noqa: F401

    log_format = {
        "json": kopf.LogFormat.JSON,
        "plain": kopf.LogFormat.PLAIN,
        "full": kopf.LogFormat.FULL,
    }[args.log_format]
    kopf.configure(verbose=args.verbose, debug=args.debug, log_format=log_format)
    namespaces = list(args.namespace)
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=f"http://{args.health_address}/healthz",
                standalone=args.peering is None,
                peering_name=args.peering,
                memo=kopf.Memo(
                    metrics_address=args.metrics_address,
                    resync_seconds=args.resync_interval,
                ),
            )
        )
    except KeyboardInterrupt:  # pragma: no cover - interactive use
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
