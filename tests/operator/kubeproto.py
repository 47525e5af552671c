"""Decode the protobuf bodies Kubernetes clients send, for the few kinds they send that way.

client-go's typed clients (kubectl create secret/configmap, helm's release
Secrets) encode request bodies as protobuf: the magic ``k8s\\0`` followed by a
``runtime.Unknown`` envelope (apiVersion, kind, raw message). ``decode(body)``
returns the object as the JSON dict the API would accept, for Secret,
ConfigMap and DeleteOptions; any other kind raises ``ValueError`` (the
emulator answers 415 and the test sees why). Wire format only: varints,
length-delimited fields; field numbers from k8s.io/api's generated.proto.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterator
from typing import Any

MAGIC = b"k8s\x00"

# message name → {field number: (json name, type)}; types: str, bytes, int, bool, time,
# map:str (map<string,string>), map:bytes (map<string,bytes>), [str] (repeated string),
# or another message name (prefix "[" for repeated).
SCHEMAS: dict[str, dict[int, tuple[str, str]]] = {
    "Unknown": {
        1: ("typeMeta", "TypeMeta"),
        2: ("raw", "bytes"),
        3: ("contentEncoding", "str"),
        4: ("contentType", "str"),
    },
    "TypeMeta": {1: ("apiVersion", "str"), 2: ("kind", "str")},
    "ObjectMeta": {
        1: ("name", "str"),
        2: ("generateName", "str"),
        3: ("namespace", "str"),
        4: ("selfLink", "str"),
        5: ("uid", "str"),
        6: ("resourceVersion", "str"),
        7: ("generation", "int"),
        8: ("creationTimestamp", "time"),
        9: ("deletionTimestamp", "time"),
        10: ("deletionGracePeriodSeconds", "int"),
        11: ("labels", "map:str"),
        12: ("annotations", "map:str"),
        13: ("ownerReferences", "[OwnerReference"),
        14: ("finalizers", "[str"),
    },
    "OwnerReference": {
        1: ("kind", "str"),
        3: ("name", "str"),
        4: ("uid", "str"),
        5: ("apiVersion", "str"),
        6: ("controller", "bool"),
        7: ("blockOwnerDeletion", "bool"),
    },
    "Secret": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:bytes"),
        3: ("type", "str"),
        4: ("stringData", "map:str"),
        5: ("immutable", "bool"),
    },
    "ConfigMap": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:str"),
        3: ("binaryData", "map:bytes"),
        4: ("immutable", "bool"),
    },
    "DeleteOptions": {
        1: ("gracePeriodSeconds", "int"),
        2: ("preconditions", "Preconditions"),
        3: ("orphanDependents", "bool"),
        4: ("propagationPolicy", "str"),
        5: ("dryRun", "[str"),
    },
    "Preconditions": {1: ("uid", "str"), 2: ("resourceVersion", "str")},
    "Namespace": {
        1: ("metadata", "ObjectMeta"),
        2: ("spec", "NamespaceSpec"),
        3: ("status", "NamespaceStatus"),
    },
    "NamespaceSpec": {1: ("finalizers", "[str")},
    "NamespaceStatus": {1: ("phase", "str")},
    "MapEntry": {1: ("key", "bytes"), 2: ("value", "bytes")},
    "Time": {1: ("seconds", "int"), 2: ("nanos", "int")},
}


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded Kubernetes object; ValueError if not supported."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf body (no k8s\\0 magic)")
    envelope = _message(body[len(MAGIC) :], "Unknown")
    type_meta = envelope.get("typeMeta", {})
    kind = type_meta.get("kind", "")
    if kind not in ("Secret", "ConfigMap", "Namespace", "DeleteOptions"):
        raise ValueError(f"the emulator cannot decode protobuf {kind or 'objects'}; send JSON")
    obj = _message(envelope.get("raw", b""), kind)
    return {"apiVersion": type_meta.get("apiVersion", "v1"), "kind": kind, **obj}


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire == 1:
            value, position = data[position : position + 8], position + 8
        elif wire == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _message(data: bytes, name: str) -> dict[str, Any]:
    schema = SCHEMAS[name]
    result: dict[str, Any] = {}
    for number, _, value in _fields(data):
        if number not in schema:
            continue  # a field this decoder does not know: dropped, as pruning would
        field, kind = schema[number]
        if kind.startswith("["):
            item_kind = kind[1:]
            result.setdefault(field, []).append(
                value.decode() if item_kind == "str" else _message(value, item_kind)
            )
        elif kind.startswith("map:"):
            entry = _message(value, "MapEntry")
            key = entry.get("key", b"").decode()
            raw = entry.get("value", b"")
            result.setdefault(field, {})[key] = (
                base64.b64encode(raw).decode() if kind == "map:bytes" else raw.decode()
            )
        else:
            scalar = _scalar(value, kind)
            if scalar not in ("", None):  # Go's omitempty: unset strings and times
                result[field] = scalar
    return result


def _scalar(value: Any, kind: str) -> Any:
    if kind == "str":
        return value.decode()
    if kind == "bytes":
        return value
    if kind == "int":
        return value - (1 << 64) if value >= 1 << 63 else value
    if kind == "bool":
        return bool(value)
    if kind == "time":
        seconds = _message(value, "Time").get("seconds", 0)
        if not seconds:
            return None
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return _message(value, kind)
