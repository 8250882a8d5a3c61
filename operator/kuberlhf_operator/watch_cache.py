"""The children of every pipeline as kopf's watch streams last showed them (kopf indexes, ``@kopf.index`` in
``handlers``), so that a reconcile reads them from memory instead of listing five kinds per reconcile.

At 100 pipelines the four lists per reconcile were the largest share of the reconcile's wall time (bench/RESULTS.md
§4): each one a quorum read from etcd on a server that shares the CPU with the operator.

Why a stale view is safe here (reconcile.py):

- a child created by the previous decision but not yet seen on the watch looks missing, so the decision creates it
  again under the same deterministic name, which the API server answers 409 (``Kube.create`` returns False): never
  a second Job for one attempt;
- a child's state can only lag (a Job still Running that already failed): the next watch event wakes the pipeline;
- the decisions that must not be taken on a lagging view read fresh: the pods of a current attempt whose Job failed
  (is it a user error, a disruption or a failure: ``cluster.gather``), and the pods' reports in the workload-identity
  probe (``storage_probe``), because pods and Jobs arrive on different streams with no order between them.

The index values are the objects without ``metadata.managedFields`` (most of an object's bytes on the wire, read by
nothing here), keyed by (namespace, pipeline label)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kuberlhf_operator import LABEL_PIPELINE

# kopf index id (a handler's kwarg name) per kind the operator reads of its children
INDEX_OF_KIND = {
    "Job": "kuberlhf_jobs",
    "Service": "kuberlhf_services",
    "Deployment": "kuberlhf_deployments",
    "NetworkPolicy": "kuberlhf_network_policies",
    "Pod": "kuberlhf_stage_pods",
}


def index_entry(body: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]] | None:
    """What an index keeps of one child: ``{(namespace, pipeline): the object}``; None (nothing) without the label."""
    meta = dict(body.get("metadata") or {})
    pipeline = (meta.get("labels") or {}).get(LABEL_PIPELINE)
    if not pipeline:
        return None
    meta.pop("managedFields", None)
    return {(meta.get("namespace") or "", pipeline): {**body, "metadata": meta}}


class WatchCache:
    """Read side of the kopf indexes: the objects of one kind a pipeline's label names, as last seen.

    ``indices`` maps index ids to kopf's live ``Index`` objects (a handler's kwargs hold them); kopf updates them on
    its event loop while reconciles read them in worker threads. ``list(store)`` copies a store's values in one C
    call under the GIL, so a reader never sees a store change size mid-iteration."""

    def __init__(self, indices: Mapping[str, Any]) -> None:
        self._indices = {kind: indices[index] for kind, index in INDEX_OF_KIND.items()}

    @staticmethod
    def holds_all(indices: Mapping[str, Any]) -> bool:
        return all(index in indices for index in INDEX_OF_KIND.values())

    def list(self, kind: str, namespace: str, pipeline: str) -> list[dict[str, Any]]:
        store = self._indices[kind].get((namespace, pipeline))
        return list(store) if store is not None else []
