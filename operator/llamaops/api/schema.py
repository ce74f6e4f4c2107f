"""Structural OpenAPI v3 schemas from the pydantic models.

Pydantic emits JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI
v3.0 schema. The conversion inlines `$ref`s, turns `Optional[X]` (anyOf with
null) into a plain optional X, rewrites numeric exclusive bounds to the v3.0
boolean form, and drops keys the API server refuses (title,
additionalProperties: false).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic import BaseModel

_DROP = {"title", "$defs", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    node = dict(node)
    if "anyOf" in node:
        members = [m for m in node.pop("anyOf") if m.get("type") != "null"]
        if len(members) != 1:
            raise ValueError(f"only Optional[X] unions are structural, got {members}")
        if node.get("default", ...) is None:
            node.pop("default")
        node = {**_resolve(members[0], defs), **node}
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key in ("properties", "x-kubernetes-validations") or key.startswith("x-kubernetes-list"):
            out[key] = value if key != "properties" else {k: _structural(v) for k, v in value.items()}
            continue
        out[key] = _structural(value)
    if "enum" in out and "type" not in out:
        out["type"] = "integer" if all(isinstance(v, int) for v in out["enum"]) else "string"
    return out


@cache
def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve(raw, raw.get("$defs", {})))
