"""How a stage process ends when something goes wrong, by whose fault (the operator reads the exit code):

- the user's configuration (a spec field, a dataset, a model path, the bucket or its keys): one clear line on
  stderr naming the field and the fix, no traceback, exit ``EXIT_USER_ERROR`` (78): never retried;
- the object store still unavailable after the stage's retry budget: exit ``EXIT_STORAGE_UNAVAILABLE`` (69),
  retried as a new attempt;
- SIGTERM (preemption, drain) after committing a checkpoint: exit ``EXIT_INTERRUPTED`` (143), resumed;
- anything else is a bug or a crash (OOM, NCCL) and keeps its traceback (exit 1, retried)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from kuberlhf.contract.stage import EXIT_INTERRUPTED, EXIT_STORAGE_UNAVAILABLE, EXIT_USER_ERROR


class StageInterrupted(RuntimeError):
    """SIGTERM arrived; the stage committed a checkpoint (or had nothing to save yet) and stops."""


class StageFailed(RuntimeError):
    """A worker exited with an error (its own message was printed by the worker); ``exit_code`` is what this
    process exits with so the operator sees the workers' verdict."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def user_error_types() -> tuple[type[BaseException], ...]:
    from kuberlhf.contract.preflight import PreflightError
    from kuberlhf.contract.spec import SpecError
    from kuberlhf.data.errors import DataError
    from kuberlhf.models.loading import ModelError
    from kuberlhf.stages.runtime import StageInputError
    from kuberlhf.storage import StorageError
    from kuberlhf.training.ds_config import DSConfigError

    return (SpecError, PreflightError, DataError, ModelError, DSConfigError, StageInputError, StorageError)


def exit_code_for(e: BaseException) -> int | None:
    """The exit code of a stage ended by ``e``; None for an unexpected error (a bug: keep the traceback)."""
    from kuberlhf.storage import StorageTransientError

    if isinstance(e, StageInterrupted):
        return EXIT_INTERRUPTED
    if isinstance(e, StageFailed):
        return e.exit_code
    if isinstance(e, StorageTransientError) or isinstance(e.__cause__, StorageTransientError):
        return EXIT_STORAGE_UNAVAILABLE
    if isinstance(e, user_error_types()) or (isinstance(e, ValueError) and "spec." in str(e)):
        return EXIT_USER_ERROR
    return None


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    try:
        yield
    except Exception as e:
        code = exit_code_for(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None
