"""A small Kubernetes API client for the handlers: read, server-side apply, delete, status, events.

The handlers need six calls (get, apply, delete, patch status, post an event,
and reading a Secret's resourceVersion); this module makes them over one pooled aiohttp
session with the same credentials kopf logs in with (in-cluster service
account first, then ``$KUBECONFIG``), via kopf's public ``ConnectionInfo``.
Applies are server-side applies (``fieldManager=mailbridge-operator``,
``force=true``): the operator owns the fields it renders and nothing else.

Every request it can make is listed in :data:`mailbridge_operator.rbac.RULES`.
Errors: :class:`ApiError` (with the HTTP status and the API's message); a
missing object is ``None`` from :meth:`Api.get`, not an error. A ``401``
re-reads the credentials once (projected service-account tokens rotate).
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import urllib.parse
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

FIELD_MANAGER = "mailbridge-operator"
USER_AGENT = "mailbridge-operator"

# kind → (plural, namespaced) for every kind the operator touches.
PLURALS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Service": "services",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ServiceMonitor": "servicemonitors",
    "MailBridge": "mailbridges",
}


class ApiError(Exception):
    """The API refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{status}: {message}")


def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """The credentials to use: the pod's service account, else ``$KUBECONFIG``."""
    return kopf.login_with_service_account(
        settings=settings, **kwargs
    ) or kopf.login_with_kubeconfig(settings=settings, **kwargs)


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a kind (and of one object when ``name`` is given)."""
    plural = PLURALS[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace is not None:
        base += f"/namespaces/{urllib.parse.quote(namespace)}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{urllib.parse.quote(name)}"
    return base


class Api:
    """One session to the API server, opened lazily, re-authenticated on 401."""

    def __init__(
        self,
        settings: kopf.OperatorSettings,
        *,
        timeout_seconds: float = 30,
        logger: logging.Logger | None = None,
    ) -> None:
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._logger = logger or logging.getLogger(__name__)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The object, or ``None`` when it does not exist (or its API is not served)."""
        status, body = await self._request("GET", path(api_version, kind, namespace, name))
        if status == 404:
            return None
        return _checked(status, body)

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: create or update the fields the operator owns."""
        metadata = manifest["metadata"]
        url = path(
            manifest["apiVersion"], manifest["kind"], metadata.get("namespace"), metadata["name"]
        )
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        status, body = await self._request(
            "PATCH",
            url,
            params=query,
            body=manifest,
            content_type="application/apply-patch+yaml",
        )
        if status == 404:
            raise ApiError(
                404,
                f"the {manifest['apiVersion']} {manifest['kind']} API is not "
                "served (is its CustomResourceDefinition installed?)",
            )
        return _checked(status, body)

    async def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        uid: str | None = None,
    ) -> bool:
        """Delete (only that ``uid`` when given); ``False`` when it was already gone."""
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        status, body = await self._request(
            "DELETE",
            path(api_version, kind, namespace, name),
            body=options,
            content_type="application/json",
        )
        if status in (404, 409):
            return False
        _checked(status, body)
        return True

    async def patch_status(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        status_patch: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Merge-patch the status subresource."""
        url = path(api_version, kind, namespace, name) + "/status"
        status, body = await self._request(
            "PATCH",
            url,
            body={"status": dict(status_patch)},
            content_type="application/merge-patch+json",
        )
        return _checked(status, body)

    async def post_event(
        self,
        owner: Mapping[str, Any],
        type: str,
        reason: str,
        message: str,
        *,
        now: datetime.datetime,
    ) -> None:
        """A core/v1 Event about ``owner``; a refusal is logged, never raised (events are aids)."""
        metadata = owner["metadata"]
        namespace = metadata["namespace"]
        stamp = now.isoformat()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{metadata['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "namespace": namespace,
                "name": metadata["name"],
                "uid": metadata["uid"],
            },
            "type": type,
            "reason": reason,
            "message": message,
            "source": {"component": FIELD_MANAGER},  # the "From" of `kubectl describe`
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": platform.node() or FIELD_MANAGER,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            status, body = await self._request(
                "POST",
                f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/events",
                body=event,
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            self._logger.warning(f"Posting the event {reason} failed: {error!r}.")
            return
        if not 200 <= status < 300:
            detail = body.get("message") if isinstance(body, dict) else body
            self._logger.warning(f"Posting the event {reason} failed ({status}: {detail}).")

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> tuple[int, Any]:
        for attempt in (1, 2):
            session = await self._open()
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                headers["Content-Type"] = content_type or "application/json"
                data = json.dumps(body)
            async with session.request(
                method, self._server + url, params=params, data=data, headers=headers
            ) as response:
                text = await response.text()
                if response.status == 401 and attempt == 1:
                    self._logger.info("The API refused the credentials; logging in again.")
                    await self.close()
                    continue
                try:
                    return response.status, json.loads(text) if text else None
                except ValueError:
                    return response.status, {"message": text[:500]}
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            info = login(self._settings)
            if info is None:
                raise ApiError(401, "no credentials: neither a service account nor a kubeconfig")
            self._server = info.server.rstrip("/")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                headers=info.as_http_headers() | {"User-Agent": USER_AGENT},
                timeout=self._timeout,
            )
        return self._session


def _checked(status: int, body: Any) -> dict[str, Any]:
    if 200 <= status < 300 and isinstance(body, dict):
        return body
    message = body.get("message") if isinstance(body, dict) else None
    raise ApiError(status, str(message or body))
