"""One reconciliation of one MailBridge: render, adopt, apply, prune, report.

``reconcile(api, owner, ...)`` reads the referenced Secrets' versions, renders
the children (:mod:`render`), adopts them (owner references), applies each one
whose live state differs from the desired state (server-side apply), deletes
children that are no longer wanted, computes the status (:mod:`status`), writes
it when it changed, and posts Kubernetes events for what it did. It is
idempotent: create, update, resume, the resync and child/Secret watchers all
call it, and a second run with nothing changed makes no write.

An invalid spec is reported (``Degraded``/``InvalidSpec`` condition and a
Warning event, once per distinct problem) and leaves the running children
alone. API failures are reported the same way (``ApplyFailed``) and returned,
so the caller decides to retry. Trusts kopf for the owner's body; posts events
through :class:`kube.Api` (not ``kopf.event``, which works only inside a kopf
handler: the resync runs outside any).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from mailbridge_operator import kube, model, render, status

# Children the operator deletes when the spec stops wanting them (kind → apiVersion).
PRUNABLE = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodDisruptionBudget": "policy/v1",
}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a reconciliation ended with."""

    status: dict[str, Any]
    invalid: bool = False
    apply_error: str | None = None
    changes: tuple[tuple[str, str], ...] = ()  # (kind, Created/Updated/Deleted)

    @property
    def outcome(self) -> str:
        """settled, waiting, invalid or failed (a metric label)."""
        if self.invalid:
            return "invalid"
        if self.apply_error:
            return "failed"
        return "settled" if self.settled else "waiting"

    @property
    def ready(self) -> bool:
        return status.is_true(self.status, status.READY)

    @property
    def settled(self) -> bool:
        """Ready and fully rolled out: nothing left to wait for."""
        return self.ready and not status.is_true(self.status, status.PROGRESSING)

    @property
    def waiting_for(self) -> str:
        for kind in (status.PROGRESSING, status.READY):
            found = status.condition(self.status, kind)
            if found is not None:
                return str(found.get("message", ""))
        return ""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def reconcile(
    api: kube.Api,
    owner: Mapping[str, Any],
    *,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    now: Callable[[], datetime.datetime] = _utcnow,
    default_image: str = model.DEFAULT_IMAGE,
) -> Outcome:
    """Bring the children of ``owner`` (a MailBridge body) to the state its spec asks for.

    ``default_image``: the bridges' image when the spec sets none (see :func:`render.render`).
    """
    metadata = owner["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    generation = metadata.get("generation")
    previous = dict(owner.get("status") or {})

    try:
        model.check_name(name)
        spec = model.parse(owner.get("spec") or {})
        versions = await _secret_versions(api, namespace, spec.secret_names)
        manifests = render.render(name, namespace, spec, versions, default_image=default_image)
    except kube.ApiError as error:
        message = f"reading the referenced Secrets: {error}"
        observation = status.Observation(generation, apply_error=message)
        new = await _write_status(api, owner, observation, previous, now())
        logger.error(f"Reconciliation failed: {message}")
        return Outcome(new, apply_error=message)
    except model.InvalidSpecError as error:
        workload = await _running_workload(api, namespace, name)
        observation = status.Observation(generation, workload=workload, problems=error.problems)
        new = await _write_status(api, owner, observation, previous, now())
        if _changed_reason(previous, new, status.DEGRADED):
            await _event(api, owner, "Warning", "InvalidSpec", _short(str(error)), now())
        logger.warning(f"Invalid spec: {error}")
        return Outcome(new, invalid=True)

    missing = tuple(secret for secret, version in versions.items() if version is None)
    applied: dict[str, dict[str, Any]] = {}
    changes: list[tuple[str, str]] = []
    apply_error = None
    where = ""
    try:
        for manifest in manifests:
            where = f"{manifest['kind']} {manifest['metadata']['name']}"
            kopf.adopt(manifest, owner=dict(owner))  # type: ignore[arg-type]
            applied[manifest["kind"]], verb = await _apply(api, manifest, logger)
            if verb:
                changes.append((manifest["kind"], verb))
                await _event(api, owner, "Normal", verb, f"{verb} {where}", now())
        where = "removing unwanted children"
        removed = await _prune(
            api, owner, keep={manifest["kind"] for manifest in manifests}, logger=logger
        )
        for kind, child in removed:
            changes.append((kind, "Deleted"))
            await _event(api, owner, "Normal", "Deleted", f"Deleted {kind} {child}", now())
    except kube.ApiError as error:
        apply_error = f"{where}: {error}"
        logger.error(f"Apply failed: {apply_error}")

    workload_kind = render.workload_kind(spec)
    workload = applied.get(workload_kind) or await api.get(
        "apps/v1", workload_kind, namespace, render.names(name)["workload"]
    )
    observation = status.Observation(
        generation,
        desired_replicas=spec.replicas,
        routes=len(spec.routes),
        workload=workload,
        config_hash=_hash_of(manifests),
        missing_secrets=missing,
        apply_error=apply_error,
    )
    new = await _write_status(api, owner, observation, previous, now())
    if apply_error and _changed_reason(previous, new, status.DEGRADED):
        await _event(api, owner, "Warning", "ApplyFailed", _short(apply_error), now())
    if missing and _changed_reason(previous, new, status.DEGRADED):
        degraded = status.condition(new, status.DEGRADED) or {}
        message = _short(str(degraded.get("message", "")))
        await _event(api, owner, "Warning", "SecretNotFound", message, now())
    if _changed_reason(previous, new, status.READY) and status.is_true(new, status.READY):
        await _event(api, owner, "Normal", "Ready", "every replica is ready to accept mail", now())
    return Outcome(new, apply_error=apply_error, changes=tuple(changes))


async def _secret_versions(
    api: kube.Api, namespace: str, names: tuple[str, ...]
) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for secret in names:
        found = await api.get("v1", "Secret", namespace, secret)
        versions[secret] = found["metadata"].get("resourceVersion") if found else None
    return versions


async def _apply(
    api: kube.Api,
    manifest: dict[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> tuple[dict[str, Any], str | None]:
    """Apply when the live object lacks anything desired; the live object and Created/Updated."""
    metadata = manifest["metadata"]
    kind, child = manifest["kind"], metadata["name"]
    live = await api.get(manifest["apiVersion"], kind, metadata["namespace"], child)
    if live is not None and contains(live, manifest):
        return live, None
    result = await api.apply(manifest)
    verb = "Created" if live is None else "Updated"
    logger.info(f"{verb} {kind} {child}.")
    return result, verb


async def _prune(
    api: kube.Api,
    owner: Mapping[str, Any],
    *,
    keep: set[str],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> list[tuple[str, str]]:
    """Delete the children the spec no longer wants; return their kinds and names."""
    removed = []
    metadata = owner["metadata"]
    names = render.names(metadata["name"])
    child_names = {
        "Deployment": names["workload"],
        "StatefulSet": names["workload"],
        "ServiceMonitor": names["service_monitor"],
        "PodDisruptionBudget": names["pdb"],
    }
    for kind, api_version in PRUNABLE.items():
        if kind in keep:
            continue
        live = await api.get(api_version, kind, metadata["namespace"], child_names[kind])
        if live is None or not _owned_by(live, metadata["uid"]):
            continue
        uid = live["metadata"].get("uid")
        if await api.delete(api_version, kind, metadata["namespace"], child_names[kind], uid=uid):
            logger.info(f"Deleted {kind} {child_names[kind]}: no longer wanted.")
            removed.append((kind, child_names[kind]))
    return removed


async def _running_workload(api: kube.Api, namespace: str, name: str) -> dict[str, Any] | None:
    for kind in ("Deployment", "StatefulSet"):
        found = await api.get("apps/v1", kind, namespace, render.names(name)["workload"])
        if found is not None:
            return found
    return None


async def _write_status(
    api: kube.Api,
    owner: Mapping[str, Any],
    observation: status.Observation,
    previous: Mapping[str, Any],
    now: datetime.datetime,
) -> dict[str, Any]:
    new = status.compute(observation, now=now, previous=previous)
    if new != previous:
        patch: dict[str, Any] = {key: None for key in previous if key not in new} | new
        metadata = owner["metadata"]
        await api.patch_status(
            model.API_VERSION, model.KIND, metadata["namespace"], metadata["name"], patch
        )
    return new


def contains(live: Any, desired: Any) -> bool:
    """Whether ``live`` holds everything ``desired`` asks for (extra live fields are fine)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            key in live and contains(live[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    return bool(live == desired)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))


def _hash_of(manifests: list[dict[str, Any]]) -> str | None:
    for manifest in manifests:
        if manifest["kind"] in ("Deployment", "StatefulSet"):
            annotations = manifest["spec"]["template"]["metadata"]["annotations"]
            return str(annotations[render.HASH_ANNOTATION])
    return None


def _changed_reason(previous: Mapping[str, Any], new: Mapping[str, Any], kind: str) -> bool:
    old, now = status.condition(previous, kind), status.condition(new, kind)
    if now is None:
        return False
    if old is None:
        return now.get("status") == "True"
    return (old.get("status"), old.get("reason"), old.get("message")) != (
        now.get("status"),
        now.get("reason"),
        now.get("message"),
    )


async def _event(
    api: kube.Api,
    owner: Mapping[str, Any],
    kind: str,
    reason: str,
    message: str,
    now: datetime.datetime,
) -> None:
    """A Kubernetes event on the MailBridge (independent of kopf's log-to-event level)."""
    await api.post_event(owner, kind, reason, message, now=now)


def _short(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
