"""The pod surface: how a user's ``podTemplate`` (a Kubernetes PodTemplateSpec) meets the pods the operator builds.

Layers, later wins: the operator's pod (its trainer container, contract env, volumes), then ``spec.podTemplate``,
then ``spec.stages.<stage>.podTemplate`` (stage pods) or ``spec.serving.podTemplate`` (the chat pod).

Merge rules (:func:`merge`, pure):
- maps merge key by key, recursively; a scalar or an unkeyed list (tolerations, args, ...) of a later layer
  replaces the earlier one;
- keyed lists merge item by item: ``containers``, ``initContainers``, ``ephemeralContainers``, ``env``,
  ``volumes``, ``imagePullSecrets`` by ``name``, ``volumeMounts`` and ``volumeDevices`` by their path (the keys
  Kubernetes' own strategic merge uses), ``ports`` by ``containerPort``. A container of a later layer merges into
  the one of the same name; an env entry, volume, mount or port replaces the one of the same key whole (``value``
  and ``valueFrom``, or two volume sources, exclude each other); new items are appended in order.

What the operator owns (:func:`owned_conflicts`): the trainer container's ``command`` and ``args``, the contract
env (``KUBERLHF_*``, ``NNODES``, ``NODE_RANK``, ``NPROC_PER_NODE``, ``MASTER_ADDR``, ``MASTER_PORT``, the S3
credential keys), its ``dshm`` volume and ``/dev/shm`` mount, the pods' ``restartPolicy``, ``subdomain`` and
``hostname`` (the rendezvous DNS names) and its ``kuberlhf.io/*`` / ``app.kubernetes.io/managed-by`` labels. A
template that sets one of them is rejected naming the field; it is never dropped and never wins.
"""

from __future__ import annotations

import copy
from typing import Any

from kuberlhf.contract import stage as contract

TRAINER_CONTAINER = "trainer"  # the operator's container in every pod it builds (stages and chat)
SHM_VOLUME = "dshm"
SHM_MOUNT = "/dev/shm"
OWNED_ENV = frozenset(
    {
        contract.ENV_NNODES,
        contract.ENV_NODE_RANK,
        contract.ENV_NPROC_PER_NODE,
        contract.ENV_MASTER_ADDR,
        contract.ENV_MASTER_PORT,
        contract.ENV_S3_ACCESS_KEY,
        contract.ENV_S3_SECRET_KEY,
    }
)
OWNED_ENV_PREFIX = "KUBERLHF_"
OWNED_CONTAINER_FIELDS = ("command", "args")
OWNED_POD_FIELDS = ("restartPolicy", "subdomain", "hostname")
OWNED_LABEL_PREFIX = "kuberlhf.io/"
OWNED_LABELS = frozenset({"app.kubernetes.io/managed-by"})

LIST_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
}
_DEEP_ITEMS = {"containers", "initContainers", "ephemeralContainers"}  # merged item by item; others replace


def is_owned_env(name: str) -> bool:
    return name in OWNED_ENV or name.startswith(OWNED_ENV_PREFIX)


def shape_errors(template: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, why) where a list the merge keys by name or path is not a list of such objects. The rest of the
    PodSpec is typed by the CRD's upstream schema on the API server."""
    out: list[tuple[str, str]] = []

    def keyed(items: Any, at: str, key: str) -> list[dict[str, Any]]:
        if items is None:
            return []
        if not isinstance(items, list) or not all(isinstance(x, dict) and isinstance(x.get(key), str) for x in items):
            out.append((at, f"must be a list of objects, each with a string '{key}'"))
            return []
        return items

    spec = template.get("spec") or {}
    for field in ("volumes", "imagePullSecrets"):
        keyed(spec.get(field), f"spec.{field}", "name")
    for field in ("containers", "initContainers"):
        for c in keyed(spec.get(field), f"spec.{field}", "name"):
            at = f"spec.{field}[{c['name']}]"
            keyed(c.get("env"), f"{at}.env", "name")
            keyed(c.get("volumeMounts"), f"{at}.volumeMounts", "mountPath")
    return out


def owned_conflicts(template: dict[str, Any]) -> list[tuple[str, str]]:
    """(path inside the template, why) for every value the operator owns. ``template`` is PodTemplateSpec wire
    form ({metadata, spec})."""
    out: list[tuple[str, str]] = []
    for key in (template.get("metadata") or {}).get("labels") or {}:
        if key.startswith(OWNED_LABEL_PREFIX) or key in OWNED_LABELS:
            out.append((f"metadata.labels[{key}]", "the operator's own label (it selects the pods by it)"))
    spec = template.get("spec") or {}
    for key in OWNED_POD_FIELDS:
        if key in spec:
            out.append((f"spec.{key}", "set by the operator (Job retries and the rendezvous depend on it)"))
    for vol in spec.get("volumes") or []:
        if vol.get("name") == SHM_VOLUME:
            out.append((f"spec.volumes[{SHM_VOLUME}]", "the operator's /dev/shm volume; size it with spec.shmSize"))
    for init in spec.get("initContainers") or []:
        if init.get("name") == TRAINER_CONTAINER:
            out.append(
                (
                    f"spec.initContainers[{TRAINER_CONTAINER}]",
                    "the operator's container name; give the init container another name",
                )
            )
    for c in spec.get("containers") or []:
        if c.get("name") != TRAINER_CONTAINER:
            continue
        at = f"spec.containers[{TRAINER_CONTAINER}]"
        for key in OWNED_CONTAINER_FIELDS:
            if key in c:
                out.append(
                    (
                        f"{at}.{key}",
                        "the stage or serve command is the operator's; set what it does through the spec fields",
                    )
                )
        for env in c.get("env") or []:
            name = str(env.get("name"))
            if is_owned_env(name):
                out.append((f"{at}.env[{name}]", "part of the stage contract"))
        for mount in c.get("volumeMounts") or []:
            if mount.get("mountPath") == SHM_MOUNT or mount.get("name") == SHM_VOLUME:
                out.append(
                    (
                        f"{at}.volumeMounts[{mount.get('mountPath')}]",
                        "the operator mounts /dev/shm; size it with spec.shmSize",
                    )
                )
    return out


def _merge_list(key: str, base: list[Any], overlay: list[Any]) -> list[Any]:
    field = LIST_KEYS.get(key)
    if field is None or not all(isinstance(x, dict) and field in x for x in [*base, *overlay]):
        return copy.deepcopy(overlay)
    out = [copy.deepcopy(x) for x in base]
    index = {x[field]: i for i, x in enumerate(out)}
    for item in overlay:
        at = index.get(item[field])
        if at is None:
            index[item[field]] = len(out)
            out.append(copy.deepcopy(item))
        elif key in _DEEP_ITEMS:
            out[at] = merge(out[at], item)
        else:
            out[at] = copy.deepcopy(item)
    return out


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base`` by the rules above; neither argument is changed."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = _merge_list(key, old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_layers(base: dict[str, Any], *layers: dict[str, Any] | None) -> dict[str, Any]:
    out = base
    for layer in layers:
        if layer:
            out = merge(out, layer)
    return out
