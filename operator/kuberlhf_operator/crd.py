"""Generate the RLHFPipeline CustomResourceDefinition from the pydantic spec models.

The spec models (``kuberlhf.contract.spec``) are the single source of truth; this module turns their JSON schema
into a *structural* OpenAPI v3 schema the API server (v1.20+) accepts: ``$ref`` inlined, ``Optional[X]`` as X,
exclusive bounds in OpenAPI 3.0 form, ``additionalProperties: false`` dropped (the server prunes unknown fields),
``x-kubernetes-preserve-unknown-fields`` only where the value is free-form (resources, affinity, tolerations,
dataset entries that may be a string or an object). Preset-governed fields (model default ``None``) get no
default, so the presets can still fill them per deploymentType.

``python -m kuberlhf_operator.crd > crds/rlhfpipelines.yaml`` writes the committed file.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from kuberlhf.contract.spec import API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAME, PipelineSpec, Stage
from kuberlhf_operator import podschema

STATUS_PHASES = ["Pending", "Running", "Succeeded", "Failed", "Suspended"]
STATUS_STAGES = [s.value for s in Stage] + ["serving", "done"]
STAGE_PHASES = ["Pending", "Running", "Succeeded", "Failed", "Suspended"]
# metadata.name is bounded so every child name (<name>-<stage>-<attempt>, pod hostnames) fits 63 characters.
MAX_NAME_LENGTH = 40

_DATASET_DEF = "DatasetRef"
_DROP_KEYS = {"title", "additionalProperties", "$defs"}


def _dataset_node(description: str | None) -> dict[str, Any]:
    # DatasetRef accepts a bare string (hub name or path) or an object; a structural schema cannot say
    # "string or object", so the node keeps any value and the operator validates it with the models.
    node: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
    node["description"] = description or (
        "A dataset: a hub name or path string, or an object {name | path, config}."
    )
    return node


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One JSON-schema node (pydantic, draft 2020-12) -> structural OpenAPI v3.0 node."""
    node = copy.deepcopy(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        if name == _DATASET_DEF:
            return _dataset_node(node.get("description"))
        merged = {**defs[name], **node}  # the field's own description/default win over the model's
        return _convert(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {branches} in a structural schema")
        if node.get("default", 0) is None:
            node.pop("default")
        return _convert({**branches[0], **node}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "default" and value is None:
            continue  # preset-governed or genuinely optional: no server-side default
        if key == "default" and value == "":
            continue  # absent means "" to the models anyway, and v1.20 rejects an empty-string default
        if key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "properties":
            out["properties"] = {k: _convert(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs)
        elif key == "description":
            out["description"] = " ".join(value.split())
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out:
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra.get("type") == "string":
            out["additionalProperties"] = {"type": "string"}  # dict[str, str]: labels, nodeSelector
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True  # dict[str, Any]: resources, affinity, ...
    if "properties" in out:
        # Nested models with a default_factory: default {} lets the server fill their own defaults.
        required = set(out.get("required", []))
        for prop_name, prop in out["properties"].items():
            if prop_name not in required and "default" not in prop and prop.get("type") == "object" \
                    and "properties" in prop and _has_default_factory(node, prop_name, defs):
                prop["default"] = {}
    return out


def _has_default_factory(node: dict[str, Any], prop_name: str, defs: dict[str, Any]) -> bool:
    raw = node.get("properties", {}).get(prop_name, {})
    return "$ref" in raw and "default" not in raw  # a plain $ref with no default = default_factory model


def spec_schema() -> dict[str, Any]:
    raw = PipelineSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema = podschema.expand(_convert(raw, defs))  # podTemplate specs: the upstream PodSpec schema
    schema["description"] = "Desired state of an RLHF pipeline (SFT -> reward model -> PPO -> chat serving)."
    return schema


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "Ready, SFTSucceeded, RewardSucceeded, PPOSucceeded, "
                                                      "Serving, Failed, Suspended or SpecChangeIgnored."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        },
    }


def _stage_status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "phase": {"type": "string", "enum": STAGE_PHASES},
            "jobName": {"type": "string", "description": "Job of the current attempt."},
            "attempts": {"type": "integer", "minimum": 0, "description": "Attempts started so far."},
            "startTime": {"type": "string", "format": "date-time"},
            "completionTime": {"type": "string", "format": "date-time"},
            "checkpoint": {"type": "string", "description": "URI of the stage's committed output."},
            "manifestSha256": {"type": "string", "description": "sha256 of the output's manifest.json."},
            "specHash": {"type": "string", "description": "sha256 of what the user wrote (the parts this stage "
                         "depends on) and the preset version, when the stage started."},
            "presetVersion": {"type": "string", "description": "Version of the deploymentType presets the stage "
                              "started with."},
            "writtenSpec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "What the user wrote (defaults and presets left out) of the parts this stage depends "
                               "on, when it started: edits are compared with it.",
            },
            "message": {"type": "string"},
            "appliedSpec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "The resolved spec this stage started with; retries reuse it.",
            },
        },
    }


def status_schema() -> dict[str, Any]:
    stage = _stage_status_schema()
    return {
        "type": "object",
        "description": "Observed state, written by the operator.",
        "properties": {
            "phase": {"type": "string", "enum": STATUS_PHASES},
            "stage": {"type": "string", "enum": STATUS_STAGES},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "attempts": {"type": "integer", "minimum": 0, "description": "Attempts of the current stage."},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "chatEndpoint": {"type": "string"},
            "conditions": {"type": "array", "items": _condition_schema()},
            "stages": {
                "type": "object",
                "properties": {name: copy.deepcopy(stage) for name in [s.value for s in Stage] + ["serving"]},
            },
        },
    }


def build_crd() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CRD, valid on Kubernetes 1.20 and later (no CEL)."""
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": MAX_NAME_LENGTH}},
            },
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "kuberlhf", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "kuberlhf"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        {"name": "Chat", "type": "string", "jsonPath": ".status.chatEndpoint"},
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m kuberlhf_operator.crd` from kuberlhf.contract.spec. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
