"""Polling with a deadline and a message that says what was awaited and what was last seen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.5,
             describe: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns something truthy; raise TimeoutError naming ``what`` (plus
    ``describe()``, e.g. the pipeline's status) when ``timeout`` passes. Exceptions from probe count as not yet."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as e:  # not there yet (404, a half-written object)
            last_error = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            extra = describe() if describe else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}. {last_error}\n{extra}".rstrip())
        time.sleep(interval)
