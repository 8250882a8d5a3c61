"""Prometheus metrics of the operator (served on :9090/metrics by main)."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from kuberlhf_operator.crd import STATUS_PHASES

PIPELINES = Gauge("kuberlhf_pipelines", "RLHFPipelines known to this operator, by phase", ["phase"])
STAGE_SECONDS = Histogram(
    "kuberlhf_stage_duration_seconds", "Wall time of a succeeded stage, first attempt start to completion", ["stage"],
    buckets=(60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 32 * 3600, 64 * 3600),
)
RECONCILE_ERRORS = Counter("kuberlhf_reconcile_errors_total", "Reconciles that raised", ["kind"])
RECONCILES = Counter("kuberlhf_reconciles_total", "Reconciles run", ["trigger"])

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def set_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a pipeline's phase (None: it is gone) and refresh the by-phase gauge."""
    with _lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = phase
        counts = {p: 0 for p in STATUS_PHASES}
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            PIPELINES.labels(phase=p).set(n)
