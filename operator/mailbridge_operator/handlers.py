"""The kopf handlers: thin wiring from Kubernetes events to :func:`reconcile.reconcile`.

- MailBridge create / update / resume: reconcile; ``TemporaryError`` (retry
  later) while the pods are not ready or an apply failed. An invalid spec ends
  the handler (the status and a Warning event say why): no retry loop, the
  next edit of the spec runs it again.
- Any MailBridge event whose ``metadata.generation`` differs from
  ``status.observedGeneration`` reconciles at once: a spec edited while kopf
  still waits to retry the previous change is not delayed.
- One resync task per operator (:mod:`resync`, started on startup, cancelled on
  cleanup) reconciles each MailBridge that had no pass for the resync interval
  (drift the watchers cannot see, ServiceMonitors, status freshness). It walks
  a kopf index of the served MailBridges. Not a ``@kopf.timer``: kopf would keep
  its finalizer on every MailBridge, and none could be deleted while no
  operator runs.
- Children (ConfigMaps, Services, Deployments, StatefulSets,
  PodDisruptionBudgets with ``app.kubernetes.io/managed-by=mailbridge-operator``)
  and referenced Secrets: a change reconciles their MailBridge at once, so a
  deleted or edited child is restored, a rotated Secret rolls the pods, and a
  Deployment becoming ready shows in the status.

Reconciliations of one MailBridge never overlap (a lock per namespace/name), and
bursts of child events collapse into one pass. Deletion needs no handler: the
children carry owner references and the garbage collector removes them. So no
handler needs kopf's finalizer, and kopf adds none (and removes the one older
versions of the operator added, the first time it handles the MailBridge).
kopf keeps its bookkeeping in ``mailbridge.io/`` annotations, so the status
holds only what the CRD's schema describes. The bridges' default image comes
from the memo (``bridge_image``, which the CLI reads from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from mailbridge_operator import kube, metrics, model, reconcile, render, resync

GROUP, VERSION, PLURAL = model.GROUP, model.VERSION, model.PLURAL
MANAGED = {"app.kubernetes.io/managed-by": render.MANAGER}
NOT_READY_RETRY_SECONDS = 15.0
APPLY_RETRY_SECONDS = 30.0


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: kopf.Logger,
    mailbridge_keys: kopf.Index[resync.Key, None],
    **_: Any,
) -> None:
    """Keep kopf's state in annotations, post only warnings from logs, open the API client,
    serve the metrics, start the resync."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    memo.setdefault("api", kube.Api(settings))
    memo.setdefault("locks", {})
    memo.setdefault("pending", set())
    interval = memo.get("resync_seconds") or resync.DEFAULT_INTERVAL_SECONDS
    memo.setdefault("schedule", resync.Schedule(interval))
    address = memo.get("metrics_address")
    if address and memo.get("metrics_runner") is None:
        host, _, port = str(address).rpartition(":")
        memo.metrics_runner = await metrics.serve(host or "0.0.0.0", int(port))
    if memo.get("resync_task") is None:
        # The index is live: kopf fills it once it lists the MailBridges.
        memo.resync_task = asyncio.create_task(
            resync.run(
                memo.schedule,
                lambda: list(mailbridge_keys),
                lambda key: _reconcile_by_name(memo, key[0], key[1], logger),
                logger=logger,
            ),
            name="mailbridge resync",
        )
        memo.resync_task.add_done_callback(lambda task: _report_end(task, logger))


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else ``$KUBECONFIG``."""
    return kube.login(settings)


@kopf.on.probe(id="resync")
def resync_running(memo: kopf.Memo, **_: Any) -> int:
    """For ``/healthz``: how many MailBridges the resync tracks; fails once it has stopped
    (so the liveness probe restarts an operator whose drift correction died)."""
    task = memo.get("resync_task")
    if task is None or task.done():
        raise kopf.PermanentError("the periodic resync is not running")
    return len(memo.schedule)


def _report_end(task: asyncio.Task[None], logger: kopf.Logger) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("The periodic resync stopped.", exc_info=task.exception())


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync_task")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # logged by _report_end
            await task
    api = memo.get("api")
    if api is not None:
        await api.close()
    runner = memo.get("metrics_runner")
    if runner is not None:
        await runner.cleanup()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_mailbridge(
    body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    outcome = await _reconcile_locked(memo, body, logger)
    if outcome is None or outcome.invalid:
        return
    if outcome.apply_error:
        raise kopf.TemporaryError(outcome.apply_error, delay=APPLY_RETRY_SECONDS)
    if not outcome.settled:
        raise kopf.TemporaryError(
            f"waiting for the bridges: {outcome.waiting_for}", delay=NOT_READY_RETRY_SECONDS
        )


@kopf.on.event(GROUP, VERSION, PLURAL)
async def spec_changed(
    type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Act on a new generation at once, even while kopf retries a handler for an old one."""
    if type in (None, "DELETED") or body.metadata.get("deletionTimestamp"):
        return
    if body.status.get("observedGeneration") == body.metadata.get("generation"):
        return
    await _reconcile_by_name(
        memo, body.metadata.namespace or "", body.metadata.name or "", logger, uid=body.metadata.uid
    )


@kopf.index(GROUP, VERSION, PLURAL)
def mailbridge_keys(namespace: str, name: str, **_: Any) -> dict[resync.Key, None]:
    """Every MailBridge the operator serves: what the resync walks."""
    return {(namespace, name): None}


@kopf.index(GROUP, VERSION, PLURAL)
def secret_users(
    namespace: str, name: str, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], str]:
    """(namespace, Secret name) → the MailBridges that read that Secret."""
    return {(namespace, secret): name for secret in _secret_names(spec)}


@kopf.on.event("", "v1", "secrets")
async def secret_changed(
    type: str | None,
    namespace: str,
    name: str,
    secret_users: kopf.Index[tuple[str, str], str],
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    if type is None:  # the initial listing: resume handles existing objects
        return
    for owner in sorted(set(secret_users.get((namespace, name), []))):
        logger.info(f"Secret {name} changed: reconciling MailBridge {owner}.")
        await _reconcile_by_name(memo, namespace, owner, logger)


@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
async def child_changed(
    type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    if type is None:
        return
    for ref in body.metadata.get("ownerReferences", []):
        if ref.get("kind") == model.KIND and str(ref.get("apiVersion", "")).startswith(GROUP):
            await _reconcile_by_name(
                memo, body.metadata.namespace or "", ref["name"], logger, uid=ref.get("uid")
            )


async def _reconcile_by_name(
    memo: kopf.Memo, namespace: str, name: str, logger: kopf.Logger, *, uid: str | None = None
) -> None:
    api: kube.Api = memo.api
    key = (namespace, name)
    if key in memo.pending:  # a pass is already queued; it will see this change too
        return
    memo.pending.add(key)
    try:
        async with _lock(memo, key):
            memo.pending.discard(key)
            owner = await api.get(model.API_VERSION, model.KIND, namespace, name)
            if owner is None or owner["metadata"].get("deletionTimestamp"):
                return
            if uid is not None and owner["metadata"].get("uid") != uid:
                return  # a new MailBridge of the same name; the old child is garbage
            await _pass(memo, owner, logger)
    finally:
        memo.pending.discard(key)


async def _reconcile_locked(
    memo: kopf.Memo, body: kopf.Body, logger: kopf.Logger
) -> reconcile.Outcome | None:
    key = (body.metadata.namespace or "", body.metadata.name or "")
    async with _lock(memo, key):
        # Read the latest state: a watcher may have written the status meanwhile.
        fresh = await memo.api.get(model.API_VERSION, model.KIND, key[0], key[1])
        if fresh is None or fresh["metadata"].get("uid") != body.metadata.uid:
            return None
        return await _pass(memo, fresh, logger)


async def _pass(
    memo: kopf.Memo, owner: Mapping[str, Any], logger: kopf.Logger
) -> reconcile.Outcome:
    """One reconciliation, counted in the metrics and in the resync's schedule."""
    key = (owner["metadata"]["namespace"], owner["metadata"]["name"])
    started = time.monotonic()
    try:
        outcome = await reconcile.reconcile(
            memo.api,
            owner,
            logger=logger,
            default_image=memo.get("bridge_image") or model.DEFAULT_IMAGE,
        )
    except Exception:
        metrics.observe("failed", time.monotonic() - started, ())
        raise
    finally:
        memo.schedule.passed(key, time.monotonic())
    metrics.observe(outcome.outcome, time.monotonic() - started, outcome.changes)
    return outcome


def _lock(memo: kopf.Memo, key: tuple[str, str]) -> asyncio.Lock:
    locks: dict[tuple[str, str], asyncio.Lock] = memo.locks
    return locks.setdefault(key, asyncio.Lock())


def _secret_names(spec: Mapping[str, Any]) -> set[str]:
    """Referenced Secrets, read leniently (an invalid spec still names its Secrets)."""
    names: set[str] = set()
    for route in spec.get("routes") or []:
        webhook = (route or {}).get("webhook") or {}
        refs = [
            webhook.get("signingSecretRef"),
            *(webhook.get("additionalSigningSecretRefs") or []),
        ]
        names.update(ref["name"] for ref in refs if isinstance(ref, Mapping) and ref.get("name"))
    secret_name = (spec.get("tls") or {}).get("secretName")
    if secret_name:
        names.add(secret_name)
    return names
