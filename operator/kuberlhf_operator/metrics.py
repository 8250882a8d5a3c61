"""Prometheus metrics of the operator (served on :9090/metrics by main)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from kuberlhf_operator.crd import STATUS_PHASES

PIPELINES = Gauge("kuberlhf_pipelines", "RLHFPipelines known to this operator, by phase", ["phase"])
STAGE_SECONDS = Histogram(
    "kuberlhf_stage_duration_seconds", "Wall time of a succeeded stage, first attempt start to completion", ["stage"],
    buckets=(60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 32 * 3600, 64 * 3600),
)
RECONCILE_ERRORS = Counter("kuberlhf_reconcile_errors_total", "Reconciles that raised", ["kind"])
RECONCILES = Counter("kuberlhf_reconciles_total", "Reconciles run", ["trigger"])
# where a reconcile's wall time goes (lock: waiting for another reconcile of the same pipeline; read, gather,
# probe, decide, apply, status, events): what the operator bench prints at 100 pipelines
RECONCILE_PHASE_SECONDS = Histogram(
    "kuberlhf_reconcile_phase_seconds", "Wall time of each phase of a reconcile", ["phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

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


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block into ``kuberlhf_reconcile_phase_seconds{phase=name}``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        RECONCILE_PHASE_SECONDS.labels(phase=name).observe(time.perf_counter() - t0)
