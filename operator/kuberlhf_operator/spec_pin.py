"""The pin of a started stage, and whether the user changed what it pins. Pure functions.

A stage that started keeps the spec it started with (its newest Job's, see ``reconcile.Snapshot``); a later
edit of the parts it depends on is reported as ``SpecChangeIgnored``. The pin is a digest plus the written
fields it covers, kept in ``status.stages.<stage>`` to tell an edit from an upgrade; nothing is built from it. The pin covers what the user *wrote* (the spec before
the presets, without fields equal to their default: :func:`kuberlhf.contract.spec.written_spec`) plus the
recorded preset version, so an operator upgrade does not cry wolf on every running pipeline:

- a release that adds a field with a default: the API server (or the models) fill in the default, which is not
  "written", so the pin does not move;
- a release that changes a preset: the preset's values are not written either, and the pin keeps the preset
  version it was made with;
- a real edit: a written field whose resolved value now differs from the started stage's, or a written field
  the user removed whose resolved value changed with it.

Records made by a release before this scheme (no ``presetVersion``) compare the written fields only and are then
re-pinned.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kuberlhf.contract.presets import preset_version

SERVING = "serving"
# Top-level spec fields a training stage does not depend on: changing them never "changes a started stage".
_NOT_STAGE_FIELDS = {"stages", "serving", "suspend"}
_SERVING_FIELDS = ("serving", "image", "imagePullPolicy", "podTemplate", "shmSize", "accelerator")
_MISSING = object()


def relevant_spec(wire: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of a spec (resolved or written) a stage depends on."""
    if stage == SERVING:
        return {k: wire[k] for k in _SERVING_FIELDS if k in wire}
    out = {k: v for k, v in wire.items() if k not in _NOT_STAGE_FIELDS}
    stage_part = (wire.get("stages") or {}).get(stage)
    if stage_part is not None:
        out["stages"] = {stage: stage_part}
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pin(written: dict[str, Any], stage: str) -> dict[str, Any]:
    """What ``status.stages.<stage>`` records when the stage starts."""
    part = relevant_spec(written, stage)
    version = preset_version()
    return {
        "specHash": _digest({"written": part, "presetVersion": version}),
        "presetVersion": version,
        "writtenSpec": part,
    }


def leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths to the non-dict values of a nested dict (lists count as one value)."""
    if isinstance(value, dict) and value:
        return [p for k in sorted(value) for p in leaf_paths(value[k], (*prefix, k))]
    return [prefix] if prefix else []


def _get(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def changed_since_pin(
    record: dict[str, Any],
    written: dict[str, Any],
    resolved: dict[str, Any],
    stage: str,
    applied: dict[str, Any] | None = None,
) -> list[str]:
    """Dotted ``spec.`` paths the user changed since ``stage`` started (``record`` is its status entry,
    ``applied`` the resolved spec it runs with, from its Job; None where no Job says, e.g. serving: then the
    written values are compared with the pinned written values)."""
    now = relevant_spec(written, stage)
    then = record.get("writtenSpec") if record.get("presetVersion") else None
    if then is not None and _digest({"written": now, "presetVersion": record["presetVersion"]}) == record.get(
        "specHash"
    ):
        return []
    paths = set(leaf_paths(now))
    if then is not None:  # written then, not any more: the user removed it
        paths |= {p for p in leaf_paths(then) if _get(now, p) is _MISSING}
    if applied is None:
        if then is None:
            return []  # a record of an earlier release with nothing to compare: re-pinned by the caller
        return sorted("spec." + ".".join(p) for p in paths if _get(now, p) != _get(then, p))
    # compare resolved values (the same representation on both sides), on the written paths only
    was, current = relevant_spec(applied, stage), relevant_spec(resolved, stage)
    return sorted("spec." + ".".join(p) for p in paths if _get(current, p) != _get(was, p))
