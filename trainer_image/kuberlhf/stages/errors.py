"""User-facing errors of a stage: one clear line on stderr and exit code 2, no traceback (the message names
the manifest field and the fix). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

USER_ERROR_EXIT = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    from kuberlhf.contract.preflight import PreflightError
    from kuberlhf.contract.spec import SpecError
    from kuberlhf.data.errors import DataError
    from kuberlhf.models.loading import ModelError
    from kuberlhf.stages.launch import StageFailed
    from kuberlhf.stages.runtime import StageInputError
    from kuberlhf.storage import StorageError
    from kuberlhf.training.ds_config import DSConfigError

    return (SpecError, PreflightError, DataError, ModelError, DSConfigError, StageInputError, StorageError, StageFailed)


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    try:
        yield
    except Exception as e:
        if isinstance(e, user_error_types()) or (isinstance(e, ValueError) and "spec." in str(e)):
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT) from None
        raise
