"""Generate the RLHFPipeline CustomResourceDefinition from the pydantic spec models.

The spec models (``kuberlhf.contract.spec``) are the single source of truth; this module turns their JSON schema
into a *structural* OpenAPI v3 schema the API server (v1.20+) accepts: ``$ref`` inlined, ``Optional[X]`` as X,
exclusive bounds in OpenAPI 3.0 form, ``additionalProperties: false`` dropped (the server prunes unknown fields),
``x-kubernetes-preserve-unknown-fields`` only where the value is free-form (resources, affinity, tolerations,
dataset entries that may be a string or an object). Preset-governed fields (model default ``None``) get no
default, so the presets can still fill them per deploymentType.

The cross-field rules of ``kuberlhf.contract.rules`` are attached as CEL (``x-kubernetes-validations``), which
Kubernetes >= 1.25 enforces. A server older than that cannot take the key (1.20 drops it on decode, and a
client's schema check rejects it), so every copy also comes without CEL; the chart picks one by server version.

``python -m kuberlhf_operator.crd --write`` writes every committed copy (``COPIES``: crds/ and the chart's
files/) and the docs' list of the rules; ``--check`` fails naming the stale ones; without arguments it prints the
CEL variant.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from kuberlhf.contract import podspec
from kuberlhf.contract.rules import DOCS_BEGIN, DOCS_END, cel_rules_at, docs_block, rule_nodes
from kuberlhf.contract.spec import API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAME, PipelineSpec, Stage
from kuberlhf_operator import podschema

STATUS_PHASES = ["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
STATUS_STAGES = [s.value for s in Stage] + ["serving", "done"]
STAGE_PHASES = ["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
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


# One copy of the upstream PodSpec schema, at spec.podTemplate.spec: a CRD cannot share a schema between fields
# (no $ref), each copy costs ~41 KB, and five copies filled kubectl's 256 KiB client-side-apply annotation. The
# per-stage and serving podTemplate.spec are free-form here and kuberlhf checks them against the same schema
# (kuberlhf.contract.podspec, from the asset below), so a bad one is InvalidSpec naming the field.
POD_SPEC_UNTYPED = ("A Kubernetes PodSpec merged over spec.podTemplate.spec; the CRD types only that one (its "
                    "size), kuberlhf checks this one against the same schema.")


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def spec_schema() -> dict[str, Any]:
    raw = PipelineSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema = _convert(raw, defs)
    podschema.expand(schema["properties"]["podTemplate"])  # the upstream PodSpec schema
    podschema.untype(schema, POD_SPEC_UNTYPED)
    schema["description"] = ("Desired state of an RLHF pipeline (SFT -> reward model -> PPO, SFT -> DPO or SFT -> "
                             "[reward model ->] GRPO, then chat serving).")
    return schema


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "Ready, SFTSucceeded, RewardSucceeded, PPOSucceeded, "
                                                      "DPOSucceeded, GRPOSucceeded, Serving, Failed, Suspended or "
                                                      "SpecChangeIgnored."},
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
            "disruptions": {"type": "integer", "minimum": 0, "description": "Attempts a disruption ended "
                            "(preemption, eviction, drain); they do not count against backoffLimit."},
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
            "created": {"type": "array", "items": {"type": "string"}, "description": "Children created once and "
                        "not watched (Kind/name: the generated API-key Secret, the PodDisruptionBudget)."},
            "appliedSpec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "Written by releases before the spec was read only from .spec (a started stage's "
                               "settings now come from its Job); no longer read or written.",
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
            "refusedGeneration": {"type": "integer", "format": "int64", "minimum": 0, "description": "The "
                                  "generation whose child objects the API server refused (InvalidSpec): they are "
                                  "not sent again until the spec changes."},
            "chatEndpoint": {"type": "string"},
            "chatApiKeySecret": {"type": "string", "description": "Secret holding the chat's API key (key API_KEY): "
                                 "spec.serving.apiKeySecretRef, or the one the operator generated."},
            "graph": {"type": "string", "description": "The stages spec.algorithm runs, e.g. 'sft -> reward -> "
                      "ppo', 'sft -> dpo', 'sft -> grpo'."},
            "conditions": {"type": "array", "items": _condition_schema()},
            "stages": {
                "type": "object",
                # the field descriptions once, in sft's entry
                "properties": {name: copy.deepcopy(stage if name == "sft" else _without_descriptions(stage))
                               for name in [s.value for s in Stage] + ["serving"]},
            },
        },
    }


def attach_rules(schema: dict[str, Any]) -> dict[str, Any]:
    """Put each rule of the table on its schema node ("" = the object, "spec.data" = .properties.spec...)."""
    for at in rule_nodes():
        node = schema
        for part in filter(None, at.split(".")):
            node = node["properties"][part]
        node["x-kubernetes-validations"] = cel_rules_at(at)
    return schema


def build_crd(cel: bool = True) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CRD: with CEL rules for Kubernetes >= 1.25, without for 1.20-1.24."""
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
    if cel:
        attach_rules(schema)
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
                        {"name": "Algorithm", "type": "string", "jsonPath": ".spec.algorithm"},
                        {"name": "Graph", "type": "string", "jsonPath": ".status.graph", "priority": 1},
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


REPO = Path(__file__).resolve().parents[2]
# Every committed copy of the CRD, with the variant it holds (True = with CEL).
COPIES: dict[str, bool] = {
    "crds/rlhfpipelines.yaml": True,
    "crds/rlhfpipelines-pre-1.25.yaml": False,
    "charts/kuberlhf/files/rlhfpipelines.yaml": True,
    "charts/kuberlhf/files/rlhfpipelines-pre-1.25.yaml": False,
}


def render(cel: bool = True) -> str:
    variant = "" if cel else " for Kubernetes 1.20-1.24 (no CEL rules: the operator checks them)"
    header = (f"# Generated by `python -m kuberlhf_operator.crd --write` from kuberlhf.contract{variant}. "
              "Do not edit.\n")
    return header + yaml.safe_dump(build_crd(cel), sort_keys=False, width=120)


# The docs' list of the cross-field rules, between the markers of kuberlhf.contract.rules.docs_block.
RULES_DOC = "docs/kubernetes.md"


def _docs_with_rules(text: str) -> str:
    start, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if start < 0 or end < 0:
        raise ValueError(f"{RULES_DOC} lacks the markers {DOCS_BEGIN!r} ... {DOCS_END!r}")
    return text[:start] + docs_block() + text[end + len(DOCS_END):]


# Other generated files: the PodSpec schema kuberlhf checks the untyped podTemplates with.
ASSETS = {"trainer_image/kuberlhf/assets/" + podspec.SCHEMA_ASSET: podschema.asset_text}


def _generated() -> dict[str, str]:
    return {**{rel: render(cel) for rel, cel in COPIES.items()}, **{rel: make() for rel, make in ASSETS.items()}}


def stale_copies(root: Path = REPO) -> list[str]:
    """The committed copies, assets and the docs' rules list that differ from the generator's output."""
    out = []
    for rel, text in _generated().items():
        path = root / rel
        if not path.is_file() or path.read_text() != text:
            out.append(rel)
    docs = (root / RULES_DOC).read_text()
    if _docs_with_rules(docs) != docs:
        out.append(RULES_DOC)
    return out


def write_copies(root: Path = REPO) -> list[str]:
    generated = _generated()
    for rel, text in generated.items():
        (root / rel).write_text(text)
    docs = root / RULES_DOC
    docs.write_text(_docs_with_rules(docs.read_text()))
    return [*generated, RULES_DOC]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kuberlhf_operator.crd", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write every committed copy (crds/, chart files/, the docs' rules list)")
    group.add_argument("--check", action="store_true", help="fail if a committed copy is stale")
    group.add_argument("--no-cel", action="store_true", help="print the variant for Kubernetes 1.20-1.24")
    args = parser.parse_args(argv)
    if args.write:
        print("\n".join(write_copies()))
    elif args.check:
        stale = stale_copies()
        if stale:
            print(f"stale CRD copies: {', '.join(stale)}; run python -m kuberlhf_operator.crd --write",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(render(cel=not args.no_cel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
