"""The upstream Kubernetes ``PodSpec`` schema as a structural CRD schema, for ``spec.podTemplate.spec`` and its
per-stage and serving overrides.

Source: the JSON schemas of the Kubernetes OpenAPI that the ``kubernetes-validate`` package bundles per release
(``kubernetes-json-schema/v<version>-local-strict/_definitions.json``), so the CRD carries every PodSpec field
of that release with its types, enums and required keys, not a hand-picked subset. The conversion to what a CRD
accepts (apiextensions.k8s.io/v1, structural, loadable on 1.20 too):

- ``$ref`` inlined (a CRD schema cannot reference), ``["object", "null"]`` types narrowed to the non-null type;
- IntOrString and Quantity (a ``oneOf`` of string and integer/number) become ``x-kubernetes-int-or-string``;
- what a CRD schema forbids or this overlay must not carry is dropped: ``additionalProperties: false``, the
  strategic-merge and list/map-type extensions (``x-kubernetes-list-map-keys`` would demand that every key field
  be required or defaulted), group-version-kind and union markers, upstream CEL rules, server-side defaults (the
  stored pipeline keeps what the user wrote) and formats a CRD does not know;
- ``required`` is kept on every nested type (a container needs its ``name`` to be merged by name) except on the
  PodSpec itself: an overlay need not list ``containers``;
- ``ephemeralContainers`` is left out: a pod template cannot carry them (the API server refuses them on create).

Size: a CRD cannot share one schema between fields (no ``$ref``). With descriptions one PodSpec is about 280 KB
of JSON, without them 41 KB, so descriptions are dropped (``kubectl explain rlhfpipeline.spec.podTemplate.spec``
still lists every field and its type; the upstream API reference describes them), and only
``spec.podTemplate.spec`` is typed (:func:`expand`): the stage and serving overlays are free-form in the CRD
(:func:`untype`) and kuberlhf checks them against the same schema, shipped as ``kuberlhf/assets/pod-spec-schema.json``
(:func:`asset_text`, read by ``kuberlhf.contract.podspec``). The CRD is then about 100 KB, well under the 248 KiB
that ``kubectl apply``'s client-side ``last-applied-configuration`` annotation leaves (tests/operator check the
bound; helm and ``kubectl apply --server-side`` store no such annotation); five typed copies had filled it.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from kuberlhf.contract.spec import POD_SPEC_MARKER

# The Kubernetes release whose PodSpec the CRD carries. Fields newer than the cluster are pruned by 1.20-1.24
# servers and rejected by 1.25+ under fieldValidation=Strict (the operator sends it).
SCHEMA_VERSION = "1.35.0"
POD_SPEC = "io.k8s.api.core.v1.PodSpec"
# The marker the spec models put on a field whose value is a PodSpec (kuberlhf.contract.spec.PodTemplate).
MARKER = POD_SPEC_MARKER

_INT_OR_STRING = {"x-kubernetes-int-or-string": True}
_KEEP_FORMATS = {"int32", "int64", "double", "float", "byte", "date-time"}
_DROP = {
    "description",
    "default",
    "additionalProperties",
    "$schema",
    "$id",
    "title",
    "x-kubernetes-patch-merge-key",
    "x-kubernetes-patch-strategy",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-group-version-kind",
    "x-kubernetes-unions",
    "x-kubernetes-validations",
}


@cache
def _definitions(version: str) -> dict[str, Any]:
    root = resources.files("kubernetes_validate").joinpath("kubernetes-json-schema", f"v{version}-local-strict")
    return json.loads(root.joinpath("_definitions.json").read_text(encoding="utf-8"))["$defs"]


def _non_null(types: Any) -> Any:
    if isinstance(types, list):
        rest = [t for t in types if t != "null"]
        return rest[0] if len(rest) == 1 else rest
    return types


def _is_int_or_string(node: dict[str, Any]) -> bool:
    branches = node.get("oneOf") or node.get("anyOf") or []
    kinds = {_non_null(b.get("type")) for b in branches}
    return len(branches) == 2 and "string" in kinds and bool(kinds & {"integer", "number"})


def _convert(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:  # PodSpec has no recursive types today; keep any future one loadable
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return _convert(defs[name], defs, (*seen, name))
    if _is_int_or_string(node):
        return dict(_INT_OR_STRING)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "type":
            out["type"] = _non_null(value)
        elif key == "format":
            if value in _KEEP_FORMATS:
                out["format"] = value
        elif key == "enum":
            out["enum"] = [v for v in value if v is not None]
        elif key == "properties":
            out["properties"] = {k: _convert(v, defs, seen) for k, v in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs, seen)
        else:
            out[key] = value
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "properties" not in out:
        out["additionalProperties"] = _convert(extra, defs, seen)  # string maps, resource maps
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True  # a free-form object upstream too
    return out


@cache
def _pod_spec_json(version: str) -> str:
    defs = _definitions(version)
    schema = _convert(defs[POD_SPEC], defs, (POD_SPEC,))
    schema.pop("required", None)  # an overlay need not list containers
    # The API server refuses ephemeral containers in a pod template (they are added to running pods through the
    # ephemeralcontainers subresource only), so the overlay cannot carry them; leaving them out keeps the CRD
    # under kubectl's 256 KiB client-side-apply annotation.
    schema["properties"].pop("ephemeralContainers")
    return json.dumps(schema)


def pod_spec_schema(version: str = SCHEMA_VERSION) -> dict[str, Any]:
    """The structural schema of a PodSpec overlay (a fresh copy per call)."""
    return json.loads(_pod_spec_json(version))


def asset_text(version: str = SCHEMA_VERSION) -> str:
    """The schema as kuberlhf ships it (``kuberlhf/assets/pod-spec-schema.json``) for its own check of the
    podTemplates the CRD does not type (:mod:`kuberlhf.contract.podspec`)."""
    source = (f"Kubernetes {version} core/v1 PodSpec as a structural schema, generated by "
              "`python -m kuberlhf_operator.crd --write` (kuberlhf_operator.podschema). Do not edit.")
    return json.dumps({"source": source, "schema": pod_spec_schema(version)}, separators=(",", ":")) + "\n"


def _replace_marked(schema: dict[str, Any], make: Any) -> dict[str, Any]:
    """Replace every node marked with :data:`MARKER` by ``make(node)``; returns ``schema``, changed in place."""

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, child in list(node.items()):
                if isinstance(child, dict) and child.get(MARKER):
                    node[key] = make(child)
                else:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(schema)
    return schema


def untype(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """Leave every node still marked with :data:`MARKER` free-form (it keeps any value; kuberlhf checks it
    against the same schema), described by ``description``. Returns ``schema``, changed in place."""
    free = {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "description": description}
    return _replace_marked(schema, lambda _: dict(free))


def expand(schema: dict[str, Any], version: str = SCHEMA_VERSION) -> dict[str, Any]:
    """Replace every node the spec models marked with :data:`MARKER` by the PodSpec schema (keeps its
    description). Returns ``schema``, changed in place."""

    def typed(marked: dict[str, Any]) -> dict[str, Any]:
        node = pod_spec_schema(version)
        if marked.get("description"):
            node["description"] = marked["description"]
        return node

    return _replace_marked(schema, typed)
