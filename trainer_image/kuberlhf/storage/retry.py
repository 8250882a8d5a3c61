"""Riding out object-store outages: a view of an :class:`~kuberlhf.storage.ObjectStore` whose calls retry
:class:`~kuberlhf.storage.StorageTransientError` (endpoint unreachable, 5xx, throttling) with exponential backoff
for a bounded time. boto3 already retries each request a few times within seconds; this covers a store that is
down for minutes (a restart, a failover). Every store operation is idempotent (uploads skip files already there
with the same sha256, a commit rewrites manifest.json and _COMPLETE), so a retried call is safe."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from kuberlhf.storage.errors import StorageTransientError


def _say_retrying(state: RetryCallState) -> None:
    # a plain line in the pod log (the stage configures no logging): why it waits and for how long
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    print(
        f"storage unavailable, retrying in {wait:.0f}s (attempt {state.attempt_number}): {exc}",
        file=sys.stderr,
        flush=True,
    )


class RetryingStore:
    """Wraps a store; each method call is retried on transient errors for up to ``budget_s`` seconds."""

    def __init__(
        self, store: Any, budget_s: float, *, max_wait_s: float = 30.0, sleep: Callable[[float], None] | None = None
    ) -> None:
        self._store = store
        self._budget_s = budget_s
        self._max_wait_s = max_wait_s
        self._sleep = sleep

    @property
    def inner(self) -> Any:
        return self._store

    def _retrying(self) -> Retrying:
        kwargs: dict[str, Any] = {
            "retry": retry_if_exception_type(StorageTransientError),
            "stop": stop_after_delay(self._budget_s),
            "wait": wait_exponential(multiplier=0.5, max=self._max_wait_s),
            "reraise": True,  # the last StorageTransientError, not tenacity's RetryError
            "before_sleep": _say_retrying,
        }
        if self._sleep is not None:
            kwargs["sleep"] = self._sleep
        return Retrying(**kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._retrying()(attr, *args, **kwargs)

        return call
