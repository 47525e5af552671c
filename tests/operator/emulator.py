"""An emulated Kubernetes API server for tests: kmock's KubernetesEmulator, completed.

kmock 0.8's ``KubernetesEmulator`` stores objects in memory and serves them over
HTTP on loopback, but real clients (kopf, kubectl, helm) need more of the API's
semantics (see ``/work/shared/notes/testing-real-parts.md``). :class:`Emulator`
keeps kmock's server, request log, reaction DSL (a test can still write
``emulator['get /api/v1/secrets'] << 500`` to inject a failure: user reactions
win) and object store (``emulator.objects[resource, namespace, name]`` keeps
every version), and serves the Kubernetes API itself:

- object metadata: ``uid``, ``resourceVersion`` (one cluster-wide counter),
  ``generation`` (bumped when anything but metadata/status changes),
  ``creationTimestamp``, ``generateName``; kind/apiVersion in every item;
- discovery of the core kinds (kmock's bundled list) and of CRDs: a POSTed
  CustomResourceDefinition is served at once and marked Established;
- custom resources get the CRD's structural defaults and are validated
  against its schema and CEL rules (422 ``Invalid`` like the API server);
- list and watch with ``labelSelector``, ``fieldSelector``, ``resourceVersion``
  (a watch resumes after it; without it, it starts with synthetic ADDED
  events), ``sendInitialEvents`` + BOOKMARK, ``timeoutSeconds``, bookmarks;
  ``watch=1|true|True``; ``application/json`` content types;
- create (POST), replace (PUT, with optimistic concurrency), PATCH as JSON
  merge patch, JSON patch (``test`` ops → 422), strategic merge patch (lists
  of containers, volumes, env, ports... merged by key; ``$patch``
  directives) and server-side apply (per field manager, last-applied wins);
  ``dryRun``; no-op writes keep the resourceVersion and send no event;
- the ``status`` subresource: the main endpoint ignores ``.status``, the
  ``/status`` endpoint changes nothing else;
- deletion with finalizers (``deletionTimestamp``), preconditions, and
  owner-reference garbage collection (background and orphan propagation);
- namespaces: seeded, required for namespaced objects, deleting one deletes
  its objects; ``/version`` (1.35), ``/healthz``, ``/openapi/v3`` (enough for
  kubectl to use server-side field validation).

Not emulated: controllers (mark a Deployment ready by patching its status —
:meth:`Cluster.mark_rolled_out`), admission, authentication/RBAC (every
request is recorded instead: :meth:`Cluster.requests`), schema validation of
built-in kinds (use ``kubernetes-validate``), protobuf bodies (415), tables.

:class:`Cluster` runs an :class:`Emulator` in a background thread (so tests
can call blocking tools like ``kubectl``), writes a kubeconfig for it, and
offers ``kubectl()``, ``get()`` and ``wait_for()``. The ``cluster`` fixture in
``conftest.py`` yields one per test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime
import ipaddress
import itertools
import json
import os
import pathlib
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import IO, Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kubeproto
import yaml
from crdschema import CrdSchema

T = TypeVar("T")
Obj = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]

OPERATOR_AGENTS = ("kopf/", "mailbridge-operator")  # User-Agents of the operator's clients
KUBECTL = pathlib.Path(__file__).resolve().parents[2] / ".tools" / "bin" / "kubectl"
SEEDED_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# A schemaless stand-in for prometheus-operator's CRD, for tests whose bridges ask for one.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}
VERSION_INFO = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0-emulated",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25",
    "compiler": "gc",
    "platform": "linux/amd64",
}
# Lists merged by key in strategic merge patches and server-side apply.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "ports": "containerPort|port",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
}
PRIMITIVE_SETS = {"finalizers"}  # merged as sets; every other list is replaced whole


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """An error the emulated API answers with a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _not_found(resource: kmock.resource, name: str | None) -> ApiError:
    what = f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)
    return ApiError(
        404,
        "NotFound",
        f'{what} "{name}" not found',
        name=name,
        group=resource.group,
        kind=resource.plural,
    )


@dataclasses.dataclass(frozen=True)
class Target:
    """What a request addresses, parsed from its path."""

    resource: kmock.resource
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclasses.dataclass(frozen=True)
class Event:
    rv: int
    type: str
    resource: kmock.resource
    namespace: str | None
    name: str
    object: Obj


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One request, for RBAC checks: ``verb`` is the Kubernetes verb, or None for non-resources."""

    method: str
    path: str
    verb: str | None
    api_group: str | None
    resource: str | None
    user_agent: str

    @property
    def permission(self) -> tuple[str, str, str]:
        """(apiGroup, resource[/subresource], verb) as an RBAC rule would name it."""
        return self.api_group or "", self.resource or "", self.verb or ""


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API semantics real clients need (see the module docstring)."""

    _rv_counter: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[Event] = attrs.field(factory=list, init=False)
    _tick: asyncio.Event | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _schemas: dict[kmock.resource, CrdSchema] = attrs.field(factory=dict, init=False)
    _columns: dict[kmock.resource, list[Obj]] = attrs.field(factory=dict, init=False)
    _applied: dict[tuple[Key, str], Obj] = attrs.field(factory=dict, init=False)
    _ips: Iterator[int] = attrs.field(factory=lambda: itertools.count(10), init=False)
    recorded: list[Recorded] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        # Deliberately not kmock's fallbacks: this class serves the whole API in _handle().
        self.resources.load_bundled()
        for namespace in SEEDED_NAMESPACES:
            self._store_new(
                kmock.resource("", "v1", "namespaces"),
                None,
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                },
            )

    # --- entry points --------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point, with our own parsing: kmock 0.8 fails on paths such as
        ``/api/v1/namespaces`` and on binary (protobuf) bodies before any reaction runs."""
        body = await raw_request.read()
        headers = dict(raw_request.headers)
        data: Any = None
        try:
            if "protobuf" in raw_request.content_type:
                data = kubeproto.decode(body)
                body = json.dumps(data).encode()
                headers["Content-Type"] = "application/json"
            elif body:
                data = yaml.safe_load(body.decode())
        except ValueError as error:  # also yaml.YAMLError and UnicodeDecodeError
            failure = ApiError(415, "UnsupportedMediaType", str(error))
            return aiohttp.web.json_response(failure.status(), status=415)
        target = self._parse(raw_request.path.rstrip("/") or "/")
        params = dict(raw_request.query)
        watch = params.get("watch", "").lower() in ("1", "true")
        verb = self._verb(raw_request.method.upper(), target, watch) if target else None
        actions = {
            "list": kmock.action.LIST,
            "watch": kmock.action.WATCH,
            "get": kmock.action.FETCH,
            "create": kmock.action.CREATE,
            "patch": kmock.action.UPDATE,
            "update": kmock.action.UPDATE,
            "delete": kmock.action.DELETE,
        }
        request = kmock.Request(
            id=len(self._requests),
            method=raw_request.method,
            url=raw_request.url,
            params=params,
            headers=headers,
            cookies=dict(raw_request.cookies),
            body=body,
            text=body.decode(errors="replace"),
            data=data,
            raw_request=raw_request,
            action=actions.get(verb or ""),
            resource=target.resource if target else None,
            namespace=target.namespace if target else None,
            name=target.name if target else None,
            subresource=target.subresource if target else None,
        )
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as error:  # as kmock does: keep it for the test, answer 500
            if self._errors:
                self._errors[-1].append(error)
            return await self._render_error(error)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        try:  # the tests' own reactions (kmock DSL) win over the emulated API
            return await kmock.RawHandler._handle(self, request)
        except NotImplementedError:
            pass
        try:
            return await self._serve(request)
        except ApiError as error:
            return aiohttp.web.json_response(error.status(), status=error.code)

    async def close_streams(self) -> None:
        """End every watch stream (before the server stops)."""
        self._closing = True
        self._notify()

    async def _serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/") or "/"
        method = request.method.value.upper()
        user_agent = request.headers.get("User-Agent", "")
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path == "/version":
            return aiohttp.web.json_response(VERSION_INFO)
        if path == "/":
            return aiohttp.web.json_response({"paths": sorted(self._paths())})
        if path.startswith("/openapi/v3"):
            return aiohttp.web.json_response(self._openapi(path))
        if path == "/api":
            return aiohttp.web.json_response(
                {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
            )
        if path == "/apis":
            return aiohttp.web.json_response(self._group_list())
        target = self._parse(path)
        if target is None:
            discovery = self._discovery(path)
            if discovery is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return aiohttp.web.json_response(discovery)
        params = dict(request.params)
        watch = params.get("watch", "").lower() in ("1", "true")
        verb = self._verb(method, target, watch)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        resource_name = target.resource.plural + (
            f"/{target.subresource}" if target.subresource else ""
        )
        record = Recorded(method, path, verb, target.resource.group, resource_name, user_agent)
        self.recorded.append(record)
        if target.resource not in self.resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if (
            verb == "patch"
            and content_type == "application/apply-patch+yaml"
            and target.name
            and self.live(target.resource, target.namespace, target.name) is None
        ):
            # An apply that creates the object is authorized as a create too.
            self.recorded.append(dataclasses.replace(record, verb="create"))
        if target.subresource == "scale" and verb in ("get", "patch", "update"):
            return aiohttp.web.json_response(self._scale(target, request, content_type))
        if verb == "watch":
            return await self._watch(request, target, params)
        table = (
            "as=Table" in request.headers.get("Accept", "")
            and (target.resource in self._columns)
            and not target.subresource
        )
        if verb == "list":
            listed = self._list(target, params)
            return aiohttp.web.json_response(self._table(target, listed) if table else listed)
        if verb == "get":
            obj = self._read(target)
            return aiohttp.web.json_response(
                self._table(target, {"metadata": {}, "items": [obj]}) if table else obj
            )
        dry_run = "dryRun" in params
        if verb == "create":
            created = self._create(target, self._body(request, content_type), dry_run=dry_run)
            return aiohttp.web.json_response(created, status=201)
        if verb == "update":
            return aiohttp.web.json_response(
                self._replace(target, self._body(request, content_type), dry_run=dry_run)
            )
        if verb == "patch":
            return aiohttp.web.json_response(
                self._patch(target, request.body, content_type, params, dry_run=dry_run)
            )
        if verb == "delete":
            options = self._body(request, content_type) if request.body else {}
            return aiohttp.web.json_response(self._delete(target, options, dry_run=dry_run))
        if verb == "deletecollection":
            return aiohttp.web.json_response(self._delete_collection(target, params))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    @staticmethod
    def _verb(method: str, target: Target, watch: bool) -> str:
        if method == "GET":
            return "watch" if watch else ("get" if target.name else "list")
        return {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if target.name else "deletecollection",
        }.get(method, method.lower())

    @staticmethod
    def _body(request: kmock.Request, content_type: str) -> Obj:
        try:
            data = yaml.safe_load(request.body.decode()) if request.body else {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ApiError(400, "BadRequest", f"cannot decode the body: {error}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        return data

    # --- paths and discovery -------------------------------------------------

    def _parse(self, path: str) -> Target | None:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        subresource = "/".join(rest[2:]) or None
        return Target(kmock.resource(group, version, plural), namespace, name, subresource)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        return self.resources[resource]

    def _namespaced(self, resource: kmock.resource) -> bool:
        return bool(self._info(resource).namespaced)

    def _api_version(self, resource: kmock.resource) -> str:
        return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)

    def _kind(self, resource: kmock.resource) -> str:
        return self._info(resource).kind or str(resource.plural).capitalize()

    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for resource in self.resources:
            if resource.group and resource.version not in groups.setdefault(resource.group, []):
                groups[resource.group].append(str(resource.version))
        return groups

    def _paths(self) -> set[str]:
        paths = {"/api", "/api/v1", "/apis", "/version", "/healthz", "/openapi/v3"}
        for group, versions in self._group_versions().items():
            paths.add(f"/apis/{group}")
            paths.update(f"/apis/{group}/{version}" for version in versions)
        return paths

    def _group_list(self) -> Obj:
        groups = sorted(self._group_versions().items())
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group(group, versions) for group, versions in groups],
        }

    @staticmethod
    def _group(group: str, versions: list[str]) -> Obj:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def _discovery(self, path: str) -> Obj | None:
        parts = path.strip("/").split("/")
        if parts == ["api", "v1"]:
            group, version = "", "v1"
        elif parts[0] == "apis" and len(parts) == 3:
            group, version = parts[1], parts[2]
        elif parts[0] == "apis" and len(parts) == 2:
            versions = self._group_versions().get(parts[1])
            return self._group(parts[1], versions) if versions else None
        else:
            return None
        resources = [r for r in self.resources if (r.group, r.version) == (group, version)]
        if not resources:
            return None
        entries = []
        for resource in sorted(resources, key=lambda r: str(r.plural)):
            info = self._info(resource)
            entries.append(
                {
                    "name": resource.plural,
                    "singularName": info.singular or resource.plural,
                    "namespaced": bool(info.namespaced),
                    "kind": self._kind(resource),
                    "verbs": sorted(info.verbs)
                    or [
                        "create",
                        "delete",
                        "deletecollection",
                        "get",
                        "list",
                        "patch",
                        "update",
                        "watch",
                    ],
                    "shortNames": sorted(info.shortnames),
                    "categories": sorted(info.categories),
                }
            )
            for sub in sorted(info.subresources):
                entries.append(
                    {
                        "name": f"{resource.plural}/{sub}",
                        "singularName": "",
                        "namespaced": bool(info.namespaced),
                        "kind": self._kind(resource),
                        "verbs": ["get", "patch", "update"],
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": entries,
        }

    def _openapi(self, path: str) -> Obj:
        """Just enough OpenAPI v3 for kubectl to see that PATCH takes ``fieldValidation``."""
        if path.rstrip("/") == "/openapi/v3":
            prefixes = ["api/v1"] + [
                f"apis/{g}/{v}" for g, vs in self._group_versions().items() for v in vs
            ]
            return {
                "paths": {
                    p: {"serverRelativeURL": f"/openapi/v3/{p}?hash={self._rv}"} for p in prefixes
                }
            }
        gv_path = path.removeprefix("/openapi/v3/")
        group, version = ("", "v1") if gv_path == "api/v1" else tuple(gv_path.split("/")[1:3])
        paths = {}
        parameter = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
        for resource in self.resources:
            if (resource.group, resource.version) != (group, version):
                continue
            gvk = {"group": group, "version": version, "kind": self._kind(resource)}
            url = self._url(resource, "{namespace}" if self._namespaced(resource) else None)
            operation = {"x-kubernetes-group-version-kind": gvk, "parameters": [parameter]}
            paths[url + "/{name}"] = {"patch": operation, "put": operation}
            paths[url] = {"post": operation}
        return {
            "openapi": "3.0.0",
            "info": {"title": "emulator", "version": "v1.35.0"},
            "paths": paths,
            "components": {"schemas": {}},
        }

    def _url(self, resource: kmock.resource, namespace: str | None) -> str:
        base = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        return f"{base}/{resource.plural}"

    # --- storage --------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv = next(self._rv_counter)
        return self._rv

    def _notify(self) -> None:
        if self._tick is not None:
            self._tick.set()
        self._tick = asyncio.Event() if self._loop_running() else None

    @staticmethod
    def _loop_running() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _emit(self, kind: str, resource: kmock.resource, obj: Obj) -> None:
        metadata = obj["metadata"]
        self._log.append(
            Event(
                int(metadata["resourceVersion"]),
                kind,
                resource,
                metadata.get("namespace"),
                metadata["name"],
                copy.deepcopy(obj),
            )
        )
        self._notify()

    def live(self, resource: kmock.resource, namespace: str | None, name: str) -> Obj | None:
        """A copy of the object as stored now, or None."""
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].last.raw)

    def _all(self, resource: kmock.resource | None = None) -> list[tuple[Key, Obj]]:
        return [
            (key, copy.deepcopy(obj.last.raw))
            for key, obj in self.objects.items()
            if not obj.deleted and (resource is None or key[0] == resource)
        ]

    def _store(self, resource: kmock.resource, obj: Obj, event: str) -> Obj:
        metadata = obj["metadata"]
        key = (resource, metadata.get("namespace"), metadata["name"])
        metadata["resourceVersion"] = str(self._next_rv())
        stored = copy.deepcopy(obj)
        if key in self.objects:
            self.objects[key].history.append(stored)
        else:
            self.objects[key] = stored
        self._emit(event, resource, obj)
        return obj

    def _store_new(self, resource: kmock.resource, namespace: str | None, obj: Obj) -> Obj:
        metadata = obj.setdefault("metadata", {})
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", _now())
        metadata["generation"] = 1
        if namespace is not None:
            metadata["namespace"] = namespace
        return self._store(resource, obj, "ADDED")

    def _forget(self, resource: kmock.resource, obj: Obj) -> None:
        metadata = obj["metadata"]
        key = (resource, metadata.get("namespace"), metadata["name"])
        self.objects[key].delete()
        for applied in [k for k in self._applied if k[0] == key]:
            del self._applied[applied]
        metadata["resourceVersion"] = str(self._next_rv())
        self._emit("DELETED", resource, obj)

    # --- reads ----------------------------------------------------------------

    def _decorate(self, resource: kmock.resource, obj: Obj) -> Obj:
        obj["apiVersion"] = self._api_version(resource)
        obj["kind"] = self._kind(resource)
        return obj

    def _read(self, target: Target) -> Obj:
        assert target.name is not None
        obj = self.live(target.resource, target.namespace, target.name)
        if obj is None:
            raise _not_found(target.resource, target.name)
        return self._decorate(target.resource, obj)

    def _matching(self, target: Target, params: Mapping[str, str]) -> list[Obj]:
        labels = _label_selector(params.get("labelSelector", ""))
        fields = _field_selector(params.get("fieldSelector", ""))
        items = []
        for (_, namespace, name), obj in self._all(target.resource):
            if target.namespace is not None and namespace != target.namespace:
                continue
            if target.name is not None and name != target.name:
                continue
            if labels(obj) and fields(obj):
                items.append(self._decorate(target.resource, obj))
        return sorted(
            items, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"])
        )

    def _list(self, target: Target, params: Mapping[str, str]) -> Obj:
        return {
            "apiVersion": self._api_version(target.resource),
            "kind": f"{self._kind(target.resource)}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": self._matching(target, params),
        }

    async def _watch(
        self, request: kmock.Request, target: Target, params: Mapping[str, str]
    ) -> aiohttp.web.StreamResponse:
        assert request._raw_request is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        labels = _label_selector(params.get("labelSelector", ""))
        fields = _field_selector(params.get("fieldSelector", ""))
        since_text = params.get("resourceVersion", "")
        initial = params.get("sendInitialEvents") == "true" or since_text in ("", "0")
        since = self._rv if initial else int(since_text)
        deadline = time.monotonic() + float(params.get("timeoutSeconds") or 3600 * 24)

        async def send(kind: str, obj: Obj) -> None:
            line = json.dumps({"type": kind, "object": obj}) + "\n"
            await response.write(line.encode())

        if self._tick is None:
            self._tick = asyncio.Event()
        try:
            if initial:
                for obj in self._matching(target, params):
                    await send("ADDED", obj)
                if params.get("sendInitialEvents") == "true":
                    await send(
                        "BOOKMARK",
                        {
                            "kind": self._kind(target.resource),
                            "apiVersion": self._api_version(target.resource),
                            "metadata": {
                                "resourceVersion": str(since),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    )
            position = next((i for i, e in enumerate(self._log) if e.rv > since), len(self._log))
            while not self._closing and time.monotonic() < deadline:
                tick = self._tick
                while position < len(self._log):
                    event = self._log[position]
                    position += 1
                    if event.resource != target.resource:
                        continue
                    if target.namespace is not None and event.namespace != target.namespace:
                        continue
                    if target.name is not None and event.name != target.name:
                        continue
                    obj = self._decorate(target.resource, copy.deepcopy(event.object))
                    if labels(obj) and fields(obj):
                        await send(event.type, obj)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tick.wait(), min(1.0, deadline - time.monotonic()))
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    def _table(self, target: Target, listed: Obj) -> Obj:
        """A meta.k8s.io/v1 Table with the CRD's printer columns (what ``kubectl get`` shows)."""
        columns = self._columns[target.resource]
        definitions = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name of the object.",
            }
        ] + [
            {
                "name": c["name"],
                "type": c["type"],
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in columns
        ]
        rows = []
        for obj in listed["items"]:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column in columns:
                value = _json_path(obj, column["jsonPath"])
                if column["type"] == "date" and value:
                    value = _age(str(value))
                cells.append(value)
            partial = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
            rows.append({"cells": cells, "object": partial})
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": listed["metadata"].get("resourceVersion", "")},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    # --- writes ---------------------------------------------------------------

    def _check_namespace(self, target: Target, body: Obj) -> str | None:
        if not self._namespaced(target.resource):
            body.get("metadata", {}).pop("namespace", None)
            return None
        namespace = target.namespace or body.get("metadata", {}).get("namespace") or "default"
        given = body.get("metadata", {}).get("namespace")
        if given and given != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the object does not match the namespace of the request",
            )
        if self.live(kmock.resource("", "v1", "namespaces"), None, namespace) is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
        return namespace

    def _create(self, target: Target, body: Obj, *, dry_run: bool = False) -> Obj:
        metadata = body.setdefault("metadata", {})
        namespace = self._check_namespace(target, body)
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        if self.live(target.resource, namespace, metadata["name"]) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{target.resource.plural} "{metadata["name"]}" already exists',
            )
        for field in (
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "managedFields",
        ):
            metadata.pop(field, None)
        if "status" in self._info(target.resource).subresources and not self._is_crd(target):
            body.pop("status", None)
        body = self._admit(target.resource, body, None)
        if dry_run:
            return self._decorate(target.resource, body)
        stored = self._store_new(target.resource, namespace, body)
        self._after_write(target.resource, stored)
        return self._decorate(target.resource, copy.deepcopy(stored))

    def _replace(self, target: Target, body: Obj, *, dry_run: bool = False) -> Obj:
        assert target.name is not None
        old = self.live(target.resource, target.namespace, target.name)
        if old is None:
            raise _not_found(target.resource, target.name)
        expected = body.get("metadata", {}).get("resourceVersion")
        if expected and expected != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on "
                f'{target.resource.plural} "{target.name}": the object has been '
                "modified; please apply your changes to the latest version",
            )
        return self._update(target, old, body, dry_run=dry_run)

    def _patch(
        self,
        target: Target,
        raw: bytes,
        content_type: str,
        params: Mapping[str, str],
        *,
        dry_run: bool = False,
    ) -> Obj:
        assert target.name is not None
        old = self.live(target.resource, target.namespace, target.name)
        try:
            patch = yaml.safe_load(raw.decode()) if raw else {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ApiError(400, "BadRequest", f"cannot decode the patch: {error}") from None
        if content_type == "application/apply-patch+yaml":
            manager = params.get("fieldManager")
            if not manager:
                raise ApiError(422, "Invalid", "fieldManager is required for apply patches")
            if old is None:
                if target.subresource:
                    raise _not_found(target.resource, target.name)
                patch.setdefault("metadata", {})["name"] = target.name
                created = self._create(target, copy.deepcopy(patch), dry_run=dry_run)
                if not dry_run:
                    key = (target.resource, created["metadata"].get("namespace"), target.name)
                    self._applied[(key, manager)] = patch
                return created
            key = (target.resource, target.namespace, target.name)
            previous = self._applied.get((key, manager), {})
            new = _apply(old, previous, patch)
            result = self._update(target, old, new, dry_run=dry_run)
            if not dry_run:
                self._applied[(key, manager)] = patch
            return result
        if old is None:
            raise _not_found(target.resource, target.name)
        if content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise ApiError(422, "Invalid", f"the JSON patch failed: {error}") from None
        elif content_type == "application/strategic-merge-patch+json":
            new = _strategic_merge(old, patch)
        elif content_type in ("application/merge-patch+json", "application/json", ""):
            new = _merge_patch(old, patch)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
        return self._update(target, old, new, dry_run=dry_run)

    def _update(self, target: Target, old: Obj, new: Obj, *, dry_run: bool = False) -> Obj:
        """Store ``new`` in place of ``old`` with the API server's rules for each field."""
        assert target.name is not None
        new = copy.deepcopy(new)
        info = self._info(target.resource)
        has_status = "status" in info.subresources and not self._is_crd(target)
        if target.subresource == "status":
            new = {**old, "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        elif target.subresource is not None:
            raise ApiError(404, "NotFound", f"subresource {target.subresource} is not emulated")
        elif has_status:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        metadata = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "name"):
            if field in old["metadata"]:
                metadata[field] = old["metadata"][field]
            else:
                metadata.pop(field, None)
        if self._namespaced(target.resource):
            metadata["namespace"] = old["metadata"]["namespace"]
        metadata["resourceVersion"] = old["metadata"]["resourceVersion"]
        new = self._decorate(target.resource, new)
        old = self._decorate(target.resource, old)
        if old["metadata"].get("deletionTimestamp"):  # finalizers may only be removed now
            added = set(metadata.get("finalizers", [])) - set(old["metadata"].get("finalizers", []))
            if added:
                raise ApiError(422, "Invalid", "finalizers cannot be added while deleting")
        new = self._admit(target.resource, new, old)
        metadata = new["metadata"]
        if _essence(new) != _essence(old):
            metadata["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if new == old or dry_run:
            return new
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            stored = self._store(target.resource, new, "MODIFIED")
            self._remove(target.resource, stored)
            return copy.deepcopy(stored)
        stored = self._store(target.resource, new, "MODIFIED")
        self._after_write(target.resource, stored)
        return copy.deepcopy(stored)

    def _scale(self, target: Target, request: kmock.Request, content_type: str) -> Obj:
        """The ``scale`` subresource: a Scale view of ``spec.replicas``."""
        main = Target(target.resource, target.namespace, target.name, None)
        obj = self._read(main)

        def view(current: Obj) -> Obj:
            metadata = current["metadata"]
            selector = (current["spec"].get("selector") or {}).get("matchLabels") or {}
            return {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {
                    k: metadata[k]
                    for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                    if k in metadata
                },
                "spec": {"replicas": current["spec"].get("replicas", 1)},
                "status": {
                    "replicas": (current.get("status") or {}).get("replicas", 0),
                    "selector": ",".join(f"{k}={v}" for k, v in selector.items()),
                },
            }

        if request.method.value.upper() == "GET":
            return view(obj)
        patch = self._body(request, content_type)
        if content_type == "application/json-patch+json":
            raise ApiError(415, "UnsupportedMediaType", "JSON patches of scale are not emulated")
        replicas = _merge_patch(view(obj), patch)["spec"]["replicas"]
        new = copy.deepcopy(obj)
        new["spec"]["replicas"] = replicas
        return view(self._update(main, obj, new))

    def _delete(self, target: Target, options: Obj, *, dry_run: bool = False) -> Obj:
        assert target.name is not None
        obj = self.live(target.resource, target.namespace, target.name)
        if obj is None:
            raise _not_found(target.resource, target.name)
        preconditions = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) and preconditions[field] != obj["metadata"].get(field):
                raise ApiError(409, "Conflict", f"Precondition failed: {field} does not match")
        obj = self._decorate(target.resource, obj)
        if dry_run:
            return obj
        policy = options.get("propagationPolicy") or (
            "Orphan" if options.get("orphanDependents") else "Background"
        )
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                obj = self._store(target.resource, obj, "MODIFIED")
            return copy.deepcopy(obj)
        self._remove(target.resource, obj, orphan=policy == "Orphan")
        return obj

    def _delete_collection(self, target: Target, params: Mapping[str, str]) -> Obj:
        removed = []
        for obj in self._matching(target, params):
            name = obj["metadata"]["name"]
            sub = Target(target.resource, obj["metadata"].get("namespace"), name, None)
            removed.append(self._delete(sub, {}))
        return {
            "apiVersion": self._api_version(target.resource),
            "kind": f"{self._kind(target.resource)}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": removed,
        }

    def _remove(self, resource: kmock.resource, obj: Obj, *, orphan: bool = False) -> None:
        self._forget(resource, obj)
        uid = obj["metadata"].get("uid")
        if resource == kmock.resource("", "v1", "namespaces"):
            for (res, namespace, _), child in self._all():
                if namespace == obj["metadata"]["name"]:
                    self._remove(res, self._decorate(res, child))
        if resource == kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._unserve(obj)
        if orphan:
            for (res, _, _), child in self._all():
                refs = child["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == uid for ref in refs):
                    child["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    self._store(res, self._decorate(res, child), "MODIFIED")
        self.collect_garbage()

    def collect_garbage(self) -> int:
        """Delete objects whose owners are all gone (as the garbage collector would)."""
        removed = 0
        while True:
            uids = {obj["metadata"].get("uid") for _, obj in self._all()}
            orphans = [
                (key, obj)
                for key, obj in self._all()
                if obj["metadata"].get("ownerReferences")
                and not any(ref.get("uid") in uids for ref in obj["metadata"]["ownerReferences"])
            ]
            progress = False
            for (resource, _, _), obj in orphans:
                if obj["metadata"].get("finalizers"):
                    if not obj["metadata"].get("deletionTimestamp"):
                        obj["metadata"]["deletionTimestamp"] = _now()
                        self._store(resource, self._decorate(resource, obj), "MODIFIED")
                    continue
                self._forget(resource, self._decorate(resource, obj))
                removed += 1
                progress = True
            if not progress:
                return removed

    # --- admission: defaults, validation, side effects -----------------------

    def _is_crd(self, target: Target) -> bool:
        return target.resource == kmock.resource(
            "apiextensions.k8s.io", "v1", "customresourcedefinitions"
        )

    def _admit(self, resource: kmock.resource, obj: Obj, old: Obj | None) -> Obj:
        schema = self._schemas.get(resource)
        if schema is not None:
            obj = schema.defaulted(obj)
            checked = {k: v for k, v in obj.items() if k != "metadata"} | {
                "metadata": {"name": obj["metadata"].get("name", "")}
            }
            problems = schema.validate(checked)
            if problems:
                kind, name = self._kind(resource), obj["metadata"].get("name")
                raise ApiError(
                    422,
                    "Invalid",
                    f'{kind}.{resource.group} "{name}" is invalid: ' + "; ".join(problems),
                    name=name,
                    kind=kind,
                    causes=[{"message": p} for p in problems],
                )
        if resource == kmock.resource("", "v1", "services"):
            spec = obj.setdefault("spec", {})
            if old is not None and "clusterIP" in old.get("spec", {}):
                spec.setdefault("clusterIP", old["spec"]["clusterIP"])
            if spec.get("clusterIP") in (None, ""):
                spec["clusterIP"] = str(ipaddress.ip_address("10.96.0.0") + next(self._ips))
            spec.setdefault("type", "ClusterIP")
        if resource == kmock.resource("", "v1", "namespaces"):
            obj.setdefault("status", {"phase": "Active"})
        if resource == kmock.resource("", "v1", "secrets") and "stringData" in obj:
            data = obj.setdefault("data", {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()
        return obj

    def _after_write(self, resource: kmock.resource, obj: Obj) -> None:
        if resource == kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._serve_crd(obj)

    def _serve_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[resource] = kmock.ResourceInfo(
                namespaced=spec["scope"] == "Namespaced",
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                verbs={
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch",
                },
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(version.get("subresources", {})),
            )
            if "schema" in version:
                self._schemas[resource] = CrdSchema(crd, version["name"])
            if version.get("additionalPrinterColumns"):
                self._columns[resource] = version["additionalPrinterColumns"]
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
            "conditions": [
                {
                    "type": kind,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": _now(),
                }
                for kind, reason, message in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ],
        }
        self._store(
            kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
            crd,
            "MODIFIED",
        )

    def _unserve(self, crd: Obj) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            resource = kmock.resource(spec["group"], version["name"], spec["names"]["plural"])
            for (res, _, _), obj in self._all(resource):
                self._forget(res, self._decorate(res, obj))
            if resource in self.resources:
                del self.resources[resource]
            self._schemas.pop(resource, None)
            self._columns.pop(resource, None)


# --- patch algorithms ---------------------------------------------------------


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _merge_key(field: str, items: list[Any]) -> str | None:
    keys = MERGE_KEYS.get(field)
    if keys is None:
        return None
    for key in keys.split("|"):
        if all(isinstance(item, dict) and key in item for item in items):
            return key
    return None


def _strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge patch: dicts merged, keyed lists merged by key, $patch directives."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith(("$setElementOrder/", "$retainKeys", "$patch")):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name, []) if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            result[key] = _strategic_merge(result.get(key), value, key)
    return result


def _merge_list(field: str, current: list[Any], patch: list[Any]) -> list[Any]:
    merge_key = _merge_key(field, current + [p for p in patch if not _is_directive(p)])
    if merge_key is None:
        if field in PRIMITIVE_SETS:
            return current + [item for item in patch if item not in current]
        return [copy.deepcopy(item) for item in patch if not _is_directive(item)]
    result = copy.deepcopy(current)
    for item in patch:
        index = next(
            (i for i, old in enumerate(result) if old.get(merge_key) == item.get(merge_key)), None
        )
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append(_strategic_merge({}, item))
        else:
            result[index] = _strategic_merge(result[index], item)
    return result


def _is_directive(item: Any) -> bool:
    return isinstance(item, dict) and "$patch" in item


def _apply(live: Obj, previous: Obj, applied: Obj) -> Obj:
    """Server-side apply, simplified: the manager's fields become exactly ``applied``.

    Fields this manager applied before and no longer applies are removed; fields
    of other managers stay; keyed lists (containers by name...) are merged by key,
    other lists are owned whole by the last applier.
    """
    return _apply_value(live, previous, applied, "")  # type: ignore[no-any-return]


def _apply_value(live: Any, previous: Any, applied: Any, field: str) -> Any:
    if isinstance(applied, dict) and isinstance(live, dict):
        result = copy.deepcopy(live)
        before = previous if isinstance(previous, dict) else {}
        for key in before:
            if key not in applied:
                result.pop(key, None)
        for key, value in applied.items():
            result[key] = _apply_value(live.get(key), before.get(key), value, key)
        return result
    if isinstance(applied, list) and isinstance(live, list):
        merge_key = _merge_key(field, live + applied)
        if merge_key is not None:
            before_items = {
                item.get(merge_key): item for item in previous or [] if isinstance(item, dict)
            }
            applied_keys = [item[merge_key] for item in applied]
            result = [
                item
                for item in live
                if item.get(merge_key) not in before_items or item.get(merge_key) in applied_keys
            ]
            for item in applied:
                index = next(
                    (i for i, old in enumerate(result) if old.get(merge_key) == item[merge_key]),
                    None,
                )
                merged = _apply_value(
                    result[index] if index is not None else {},
                    before_items.get(item[merge_key], {}),
                    item,
                    "",
                )
                if index is None:
                    result.append(merged)
                else:
                    result[index] = merged
            return result
    return copy.deepcopy(applied)


def _essence(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


# --- printer columns -----------------------------------------------------------

_FILTER = re.compile(
    r'^(?P<field>[\w-]+)\[\?\(@\.(?P<key>[\w-]+)==["\'](?P<value>[^"\']*)["\']\)\]$'
)


def _json_path(obj: Obj, path: str) -> Any:
    """The subset of JSONPath printer columns use: ``.a.b`` and ``.a[?(@.k=="v")].b``."""
    current: Any = obj
    for part in re.findall(r"[^.\[]+(?:\[[^\]]*\])?", path.strip(".")):
        match = _FILTER.match(part)
        if match:
            items = current.get(match["field"]) if isinstance(current, dict) else None
            current = next(
                (item for item in items or [] if str(item.get(match["key"])) == match["value"]),
                None,
            )
        else:
            current = current.get(part) if isinstance(current, dict) else None
        if current is None:
            return None
    return current


def _age(timestamp: str) -> str:
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * 2:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


# --- selectors ----------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<key>!?[\w./-]+)\s*(?:(?P<op>==|!=|=|\bnotin\b|\bin\b)\s*(?P<value>\(.*\)|[\w./-]*))?\s*$"
)


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def _label_selector(text: str) -> Callable[[Obj], bool]:
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for requirement in _split_selector(text):
        match = _REQUIREMENT.match(requirement)
        if not match:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {requirement!r}")
        key, op, value = match.group("key"), match.group("op"), match.group("value")
        if op is None:
            if key.startswith("!"):
                checks.append(lambda labels, k=key[1:]: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        else:
            values = {v.strip() for v in value.strip("()").split(",")}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
    return lambda obj: all(check(obj["metadata"].get("labels") or {}) for check in checks)


def _field_selector(text: str) -> Callable[[Obj], bool]:
    checks: list[Callable[[Obj], bool]] = []
    for requirement in _split_selector(text):
        negate = "!=" in requirement
        field, _, value = requirement.replace("!=", "=").replace("==", "=").partition("=")
        checks.append(_field_check(field.strip(), value.strip(), negate))
    return lambda obj: all(check(obj) for check in checks)


def _field_check(path: str, expected: str, negate: bool) -> Callable[[Obj], bool]:
    def check(obj: Obj) -> bool:
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        actual = "" if current is None else str(current)
        return (actual == expected) != negate

    return check


# --- a running cluster for tests ----------------------------------------------


class Cluster:
    """An :class:`Emulator` served on 127.0.0.1 from a background thread, with a kubeconfig."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.emulator = Emulator()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kube-emulator", daemon=True
        )
        self._server: kmock.Server | None = None
        self.kubeconfig = directory / "kubeconfig"
        self.url = ""

    @classmethod
    @contextlib.contextmanager
    def start(cls, directory: pathlib.Path) -> Iterator[Cluster]:
        directory.mkdir(parents=True, exist_ok=True)
        cluster = cls(directory)
        cluster._thread.start()
        try:
            cluster.run(cluster._open())
            yield cluster
        finally:
            cluster.run(cluster._close())
            cluster._loop.call_soon_threadsafe(cluster._loop.stop)
            cluster._thread.join(timeout=10)
            cluster._loop.close()

    async def _open(self) -> None:
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator, host="127.0.0.1")
        await self._server.__aenter__()
        self.url = f"http://127.0.0.1:{self._server.port}"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "preferences": {},
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {
                                "cluster": "emulator",
                                "user": "tester",
                                "namespace": "default",
                            },
                        }
                    ],
                    "current-context": "emulator",
                }
            )
        )
        # The garbage collector also sweeps now and then (owners deleted while a child was
        # being created), as the real one does.
        self._loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.emulator.collect_garbage()

    async def _close(self) -> None:
        await self.emulator.close_streams()
        await asyncio.sleep(0)
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine in the emulator's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Call ``fn`` in the emulator's loop (safe access to its state)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    # --- helpers for tests -------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a client of this cluster (kubectl, the operator, helm)."""
        return (
            os.environ
            | {
                "KUBECONFIG": str(self.kubeconfig),
                "KUBECACHEDIR": str(self.directory / "kube-cache"),
            }
            | extra
        )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl (from scripts/setup) against this cluster; fails if missing."""
        if not KUBECTL.exists():
            raise AssertionError(f"{KUBECTL} is missing: run scripts/setup")
        result = subprocess.run(
            [str(KUBECTL), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def apply_file(self, path: pathlib.Path | str) -> str:
        return self.kubectl("apply", "-f", str(path)).stdout

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        """A stored object (``resource`` like ``"apps/v1/deployments"`` or ``"v1/secrets"``)."""
        res = kmock.resource(resource)
        return self.call(lambda: self.emulator.live(res, namespace, name))

    def objects_of(self, resource: str, namespace: str | None = None) -> list[Obj]:
        res = kmock.resource(resource)
        return self.call(
            lambda: [obj for (_, ns, _), obj in self.emulator._all(res) if namespace in (None, ns)]
        )

    def requests(self) -> list[Recorded]:
        return self.call(lambda: list(self.emulator.recorded))

    def resource_requests(self, *user_agent_prefixes: str) -> list[Recorded]:
        """Requests for API resources, from clients whose User-Agent starts with a prefix."""
        return [
            call
            for call in self.requests()
            if call.verb is not None
            and call.resource is not None
            and call.user_agent.startswith(user_agent_prefixes)
        ]

    def server_errors(self) -> list[Exception]:
        """Exceptions the emulator raised while serving (each one is an emulator bug)."""
        return self.call(lambda: list(self.emulator.errors))

    def create_namespace(self, name: str) -> None:
        self.kubectl("create", "namespace", name)

    def mark_rolled_out(self, namespace: str, kind: str, name: str) -> Obj:
        """Play the workload controller: every desired replica updated, ready and available."""
        resource = {"Deployment": "apps/v1/deployments", "StatefulSet": "apps/v1/statefulsets"}[
            kind
        ]
        obj = self.get(resource, namespace, name)
        assert obj is not None, f"{kind} {namespace}/{name} does not exist"
        replicas = obj["spec"].get("replicas", 1)
        status = {
            "observedGeneration": obj["metadata"]["generation"],
            "replicas": replicas,
            "readyReplicas": replicas,
            "updatedReplicas": replicas,
            "availableReplicas": replicas,
        }
        patch = json.dumps({"status": status})
        self.kubectl(
            "patch",
            kind.lower(),
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        )
        result = self.get(resource, namespace, name)
        assert result is not None
        return result

    def wait_for(
        self,
        predicate: Callable[[], T],
        *,
        timeout: float = 20,
        what: str = "the condition",
        details: Callable[[], str] = lambda: "",
    ) -> T:
        """Poll until ``predicate()`` is truthy; fail with ``what`` and ``details()`` if not."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()}")
            time.sleep(0.1)


# --- the real operator as a process -------------------------------------------


class RunningOperator:
    """What every ``mailbridge-operator`` process a test starts can do: show its log,
    wait until it watches a resource, and stop (only this process, by PID)."""

    cluster: Cluster
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path
    _log: IO[str]

    def log(self, tail: int = 80) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def wait_watching(self, resource: str = "mailbridges", timeout: float = 30) -> None:
        """Until the operator watches ``resource`` (its handlers can react from then on)."""

        def watching() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the operator exited ({self.process.returncode}):\n{self.log()}"
                )
            return any(
                r.verb == "watch" and r.resource == resource for r in self.cluster.requests()
            )

        self.cluster.wait_for(
            watching, timeout=timeout, what=f"the operator to watch {resource}", details=self.log
        )

    def wait_started(self, timeout: float = 30) -> None:
        """Until kopf watches MailBridges."""
        self.wait_watching("mailbridges", timeout)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM this process (only this one), then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode


class OperatorProcess(RunningOperator):
    """``mailbridge-operator`` running against a :class:`Cluster` (started by this test only)."""

    def __init__(
        self,
        cluster: Cluster,
        log_path: pathlib.Path,
        *args: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        executable = pathlib.Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "mailbridge-operator"
        if not executable.exists():
            executable = (
                pathlib.Path(__file__).resolve().parents[2]
                / ".venv"
                / "bin"
                / ("mailbridge-operator")
            )
        self.cluster = cluster
        self.log_path = log_path
        self.health_port = _free_port()
        self.metrics_port = _free_port()
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [
                str(executable),
                "--log-format=plain",
                "--verbose",
                f"--health-address=127.0.0.1:{self.health_port}",
                f"--metrics-address=127.0.0.1:{self.metrics_port}",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=cluster.env(**(env or {})),
            cwd=cluster.directory,
        )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
