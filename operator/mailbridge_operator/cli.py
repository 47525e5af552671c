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

The bridges run their MailBridge's ``spec.image``, else
``$MAILBRIDGE_OPERATOR_BRIDGE_IMAGE`` (the Helm chart sets it to its own
``image.*``), else the image of the operator's version
(``ghcr.io/mailbridge/mailbridge:<version>``).

Reads the environment only when run (``$KUBECONFIG``,
``$MAILBRIDGE_OPERATOR_BRIDGE_IMAGE``), never at import.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

import kopf

from mailbridge_operator import model, resync

BRIDGE_IMAGE_ENV = "MAILBRIDGE_OPERATOR_BRIDGE_IMAGE"
IMAGE_MAX_LENGTH = 512  # as the CRD's spec.image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailbridge-operator",
        description="Run the MailBridge operator: turn MailBridge resources into running bridges.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""environment:
  {BRIDGE_IMAGE_ENV}
                        the bridges' image when a MailBridge sets no spec.image
                        (the Helm chart sets it from its image.* values);
                        default: {model.DEFAULT_IMAGE}
  KUBECONFIG            the cluster to use outside a pod (in a pod: its service
                        account)""",
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


def bridge_image(environ: Mapping[str, str]) -> str:
    """The bridges' default image: ``$MAILBRIDGE_OPERATOR_BRIDGE_IMAGE`` when set (and not
    empty), else the operator's own version; :class:`ValueError` if it is no image reference."""
    image = environ.get(BRIDGE_IMAGE_ENV, "")
    if not image:
        return model.DEFAULT_IMAGE
    if len(image) > IMAGE_MAX_LENGTH or any(char.isspace() for char in image):
        raise ValueError(f"{BRIDGE_IMAGE_ENV}={image!r} is not an image reference")
    return image


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        image = bridge_image(os.environ)
    except ValueError as error:
        parser.error(str(error))
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
                    bridge_image=image,
                ),
            )
        )
    except KeyboardInterrupt:  # pragma: no cover - interactive use
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
