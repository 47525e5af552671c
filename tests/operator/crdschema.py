"""Validate custom resources against a CRD offline, the way the API server would.

``CrdSchema.load(path)`` reads a CustomResourceDefinition; ``validate(obj)``
applies the schema's defaults (structural defaulting: a parent's default first,
then its children's), checks the result with ``jsonschema`` against the
``openAPIV3Schema`` converted to JSON Schema, and evaluates every
``x-kubernetes-validations`` CEL rule with ``cel-python``. It returns one line
per problem (``spec.routes[0].webhook.url: ...``), empty when the API server
would accept the object.

Conversion: ``x-kubernetes-int-or-string`` → integer or string; ``nullable`` →
also null; objects with ``properties`` and neither ``additionalProperties`` nor
``x-kubernetes-preserve-unknown-fields`` reject unknown fields (the API server
would silently prune them; in a test a pruned field is a typo to report).

Limits: no CEL cost estimation, no ``oldSelf`` transition rules, no
``format`` checks beyond jsonschema's; ``x-kubernetes-list-type: map`` keys
are checked for uniqueness, ``set`` items too.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import celpy
import jsonschema
import yaml

_DROPPED = {
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "nullable",
    "format",
    "default",
}


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """An openAPIV3Schema node as a JSON Schema (draft 2020-12) node."""
    result: dict[str, Any] = {k: v for k, v in node.items() if k not in _DROPPED}
    if node.get("x-kubernetes-int-or-string"):
        result.pop("anyOf", None)
        result["type"] = ["integer", "string"]
    if "properties" in node:
        result["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            result["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), Mapping):
        result["additionalProperties"] = to_json_schema(node["additionalProperties"])
    if "items" in node:
        result["items"] = to_json_schema(node["items"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in result:
            result[keyword] = [to_json_schema(sub) for sub in result[keyword]]
    if node.get("nullable") and "type" in result:
        types = result["type"] if isinstance(result["type"], list) else [result["type"]]
        result["type"] = [*types, "null"]
    return result


def apply_defaults(value: Any, node: Mapping[str, Any]) -> Any:
    """Structural defaulting: fill absent properties with their defaults, top-down."""
    if isinstance(value, dict):
        for key, sub in (node.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key in value:
                if key not in (node.get("properties") or {}):
                    value[key] = apply_defaults(value[key], extra)
    elif isinstance(value, list) and "items" in node:
        return [apply_defaults(item, node["items"]) for item in value]
    return value


def walk(
    value: Any, node: Mapping[str, Any], path: str = ""
) -> Iterator[tuple[str, Any, Mapping[str, Any]]]:
    """Every (path, value, schema node) pair present in the object."""
    yield path, value, node
    if isinstance(value, Mapping):
        properties = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, sub_value in value.items():
            sub = properties.get(key) or (extra if isinstance(extra, Mapping) else None)
            if sub is not None:
                yield from walk(sub_value, sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            yield from walk(item, node["items"], f"{path}[{index}]")


class CrdSchema:
    """One served version of a CRD, ready to validate custom resources."""

    def __init__(self, crd: Mapping[str, Any], version: str | None = None) -> None:
        versions = crd["spec"]["versions"]
        chosen = next(v for v in versions if version in (None, v["name"]))
        self.crd = crd
        self.version = chosen["name"]
        self.schema: dict[str, Any] = chosen["schema"]["openAPIV3Schema"]
        self.json_schema = to_json_schema(self.schema)
        self._validator = jsonschema.Draft202012Validator(self.json_schema)
        self._cel = celpy.Environment()
        self._programs: dict[str, celpy.Runner] = {}

    @classmethod
    def load(cls, path: str | pathlib.Path, version: str | None = None) -> CrdSchema:
        return cls(yaml.safe_load(pathlib.Path(path).read_text(encoding="utf-8")), version)

    def rules(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """Every CEL rule with the schema path where it is declared."""

        def visit(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
            for rule in node.get("x-kubernetes-validations", []):
                yield path, rule
            for key, sub in (node.get("properties") or {}).items():
                yield from visit(sub, f"{path}.{key}" if path else key)
            if isinstance(node.get("additionalProperties"), Mapping):
                yield from visit(node["additionalProperties"], f"{path}.*")
            if "items" in node:
                yield from visit(node["items"], f"{path}[*]")

        yield from visit(self.schema, "")

    def defaulted(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return apply_defaults(copy.deepcopy(dict(obj)), self.schema)  # type: ignore[no-any-return]

    def validate(self, obj: Mapping[str, Any]) -> list[str]:
        """Problems the API server would report for this object (after defaulting)."""
        value = self.defaulted(obj)
        errors = sorted(self._validator.iter_errors(value), key=lambda e: str(e.absolute_path))
        problems = [f"{_format(e.absolute_path) or '(root)'}: {e.message}" for e in errors]
        if problems:  # CEL runs only on schema-valid objects, as in the API server
            return problems
        for path, node_value, node in walk(value, self.schema):
            problems.extend(self._list_problems(path, node_value, node))
            for rule in node.get("x-kubernetes-validations", []):
                if not self._evaluate(rule["rule"], node_value):
                    problems.append(f"{path or '(root)'}: {rule.get('message', rule['rule'])}")
        return problems

    def _evaluate(self, rule: str, value: Any) -> bool:
        program = self._programs.get(rule)
        if program is None:
            program = self._cel.program(self._cel.compile(rule))
            self._programs[rule] = program
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception):
            raise result
        return bool(result)

    @staticmethod
    def _list_problems(path: str, value: Any, node: Mapping[str, Any]) -> list[str]:
        if not isinstance(value, list):
            return []
        kind = node.get("x-kubernetes-list-type")
        if kind == "set":
            seen = [yaml.safe_dump(item) for item in value]
            if len(seen) != len(set(seen)):
                return [f"{path}: duplicate entries in a set"]
        if kind == "map":
            keys = [
                tuple(item.get(k) for k in node.get("x-kubernetes-list-map-keys", []))
                for item in value
            ]
            if len(keys) != len(set(keys)):
                map_keys = node.get("x-kubernetes-list-map-keys")
                return [f"{path}: duplicate entries for keys {map_keys}"]
        return []


def _format(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
