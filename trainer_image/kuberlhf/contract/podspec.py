"""kuberlhf's own check of a ``podTemplate.spec`` against the upstream Kubernetes PodSpec schema.

The CRD types only ``spec.podTemplate.spec`` with that schema: a CRD cannot share one schema between fields (no
``$ref``), each copy costs ~41 KB, and five copies left no room under the 256 KiB annotation of kubectl's
client-side apply. ``spec.stages.<stage>.podTemplate.spec`` and ``spec.serving.podTemplate.spec`` are free-form
in the CRD and checked here, with the same schema (``assets/pod-spec-schema.json``, written by
``python -m kuberlhf_operator.crd --write`` from the one the CRD carries) and the same semantics as the API
server's structural-schema validation with ``fieldValidation=Strict``: types, required keys, int-or-string, string
maps, and an unknown field is an error (jsonschema knows neither ``x-kubernetes-*`` nor unknown fields, hence
this walker). The models call it for every podTemplate, so the operator refuses a bad one as ``InvalidSpec``
naming the field before any Job exists, and ``kuberlhf run`` the same way.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_ASSET = "pod-spec-schema.json"
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
}
_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "boolean": "a boolean",
    "integer": "an integer",
    "number": "a number",
}


@cache
def pod_spec_schema() -> dict[str, Any]:
    """The structural PodSpec schema the CRD carries at ``spec.podTemplate.spec`` (do not change the result)."""
    text = resources.files("kuberlhf").joinpath("assets", SCHEMA_ASSET).read_text(encoding="utf-8")
    return json.loads(text)["schema"]


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def _item(at: str, index: int, item: Any) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    return f"{at}[{name}]" if isinstance(name, str) and name else f"{at}[{index}]"


def schema_errors(value: Any, schema: dict[str, Any], at: str) -> list[tuple[str, str]]:
    """(path, why) for every place ``value`` breaks the structural ``schema``; ``at`` is the path of ``value``.
    A null is accepted anywhere (the API server drops nulls of non-nullable fields before it validates)."""
    if value is None or schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return []
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, str) or _is(value, "integer")
        return [] if ok else [(at, "must be an integer or a string")]
    kind = schema.get("type")
    if kind and not _is(value, kind):
        return [(at, f"must be {_NAMES[kind]}, not {json.dumps(value)}")]
    out: list[tuple[str, str]] = []
    if kind == "array":
        for i, item in enumerate(value):
            out += schema_errors(item, schema.get("items", {}), _item(at, i, item))
    elif kind == "object":
        props = schema.get("properties")
        out += [(f"{at}.{key}", "required field is missing") for key in schema.get("required", []) if key not in value]
        for key, child in value.items():
            if props is not None and key in props:
                out += schema_errors(child, props[key], f"{at}.{key}")
            elif props is None and isinstance(schema.get("additionalProperties"), dict):
                out += schema_errors(child, schema["additionalProperties"], f"{at}[{key}]")
            elif props is not None:
                out.append((f"{at}.{key}", "unknown field (not in the Kubernetes PodSpec)"))
    return out


def pod_spec_errors(spec: dict[str, Any], at: str = "spec") -> list[tuple[str, str]]:
    """(path, why) where a podTemplate's ``spec`` is not a valid PodSpec overlay (``containers`` may be left out)."""
    return schema_errors(spec, pod_spec_schema(), at)
