"""What makes the operator reconcile a pipeline, kept cheap at scale: watch events only when a child's observed
state changed, a safety timer whose interval grows with the number of pipelines, and one object-store client per
(endpoint, credentials) instead of one per probe.

bench/RESULTS.md (operator section) has the numbers that motivated each piece: with 100 pipelines, every Job
status update and every 15 s timer re-ran the full reconcile with a new S3 client, and the lag grew to ~50 s.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

from kuberlhf.contract.spec import StorageSpec
from kuberlhf.contract.stage import ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY, ENV_STORAGE_ENDPOINT
from kuberlhf_operator.observe import ROUTINE_WAITING, pod_waiting, summarize_deployment, summarize_job

# --- which watch events are worth a reconcile ------------------------------------------------------------------


def job_key(job: dict[str, Any]) -> Hashable:
    """What reconcile reads from a Job; None for a Job that is not a stage Job."""
    s = summarize_job(job)
    if s is None:
        return None
    return (s.phase, s.suspended, s.deleting)


def job_first_sight_matters(key: Hashable) -> bool:
    """A Job seen for the first time (just created by the operator, or listed at operator start, which the
    resume handler covers) needs a reconcile only when it already finished, is suspended or is being deleted."""
    return key is not None and key != ("Running", False, False)


def pod_key(pod: dict[str, Any]) -> Hashable:
    """A stage pod's phase and why it waits (reconcile reports Pending with the reason, Running once one runs)."""
    phase = (pod.get("status") or {}).get("phase") or "Pending"
    wait = pod_waiting(pod)
    return (phase, wait[0] if wait else None, bool((pod.get("metadata") or {}).get("deletionTimestamp")))


def pod_first_sight_matters(key: Hashable) -> bool:
    """A new pod matters once it runs or waits for a reason a user must see (not scheduling/creating yet)."""
    phase, reason, deleting = key  # type: ignore[misc]
    return phase != "Pending" or deleting or (reason is not None and reason not in ROUTINE_WAITING)


def deployment_key(dep: dict[str, Any]) -> Hashable:
    s = summarize_deployment(dep)
    return (s.available, s.deleting, s.replicas)


def deployment_first_sight_matters(key: Hashable) -> bool:
    available, deleting, _ = key  # type: ignore[misc]
    return available or deleting


class ChangeFilter:
    """Remembers the last key of each watched object (by uid) and says whether an event changed it.

    The operator's children change status many times a run (the Job controller's ``active`` counts, a pod's
    conditions); reconcile only depends on a few fields, summarised by the ``*_key`` functions above."""

    def __init__(self) -> None:
        self._last: dict[str, Hashable] = {}
        self._lock = threading.Lock()

    def changed(self, uid: str, key: Hashable, *, first_matters: bool) -> bool:
        with self._lock:
            if uid not in self._last:
                self._last[uid] = key
                return first_matters
            if self._last[uid] == key:
                return False
            self._last[uid] = key
            return True

    def forget(self, uid: str) -> Hashable:
        """Drop an object that is gone; returns its last key (None if never seen)."""
        with self._lock:
            return self._last.pop(uid, None)

    def __len__(self) -> int:
        return len(self._last)


# --- the safety timer ------------------------------------------------------------------------------------------


def safety_interval(pipelines: int, base: float, per_pipeline: float = 0.5, cap: float = 600.0) -> float:
    """Seconds between safety reconciles of one pipeline: ``base`` for a few pipelines, growing so that all of
    them together cost at most 1/``per_pipeline`` reconciles per second (events drive the real progress)."""
    return max(base, min(cap, pipelines * per_pipeline))


class Schedule:
    """When each pipeline is next due for a safety reconcile (monotonic seconds)."""

    def __init__(self) -> None:
        self._due: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def set(self, key: tuple[str, str], at: float) -> None:
        with self._lock:
            self._due[key] = at

    def due(self, key: tuple[str, str], now: float) -> bool:
        with self._lock:
            return now >= self._due.get(key, 0.0)

    def due_keys(self, now: float) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(k for k, at in self._due.items() if now >= at)

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._due.pop(key, None)

    def __len__(self) -> int:
        return len(self._due)


# --- object-store clients ------------------------------------------------------------------------------------

_CRED_ENV = (ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY, "AWS_SESSION_TOKEN", ENV_STORAGE_ENDPOINT, "AWS_ENDPOINT_URL_S3",
             "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


def store_key(storage: StorageSpec, env: Mapping[str, str]) -> tuple[Any, ...]:
    """Cache key of an ObjectStore: endpoint settings plus a digest of the credentials (a rotated Secret gives a
    new key; the key itself holds no secret, so it is safe in a repr or a log line)."""
    digest = hashlib.sha256("\0".join(env.get(k, "") for k in _CRED_ENV).encode()).hexdigest()
    return (storage.endpoint, storage.region, storage.path_style, digest)


class StoreCache:
    """ObjectStores by :func:`store_key`, least recently used evicted (boto3 clients are thread-safe, and a new
    one costs ~10 ms CPU and several MB)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._stores: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.created = 0

    def get(self, storage: StorageSpec, env: Mapping[str, str]) -> Any:
        from kuberlhf.storage import ObjectStore

        key = store_key(storage, env)
        with self._lock:
            store = self._stores.get(key)
            if store is not None:
                self._stores.move_to_end(key)
                return store
            store = ObjectStore.from_spec(storage, env=env)
            self.created += 1
            self._stores[key] = store
            while len(self._stores) > self.size:
                self._stores.popitem(last=False)
            return store
