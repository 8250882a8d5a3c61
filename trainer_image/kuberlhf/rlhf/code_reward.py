"""Rewards from code (``spec.stages.grpo.rewardFunction``): a Python function ``f(prompt, answer) -> number``
scores each sampled answer instead of the step-2 reward model, so a verifiable task (an exact answer, a format,
a unit test) needs no reward model.

Where the function comes from:

- ``module:function``: imported from the trainer image (its PYTHONPATH: a package installed in the image, or a
  module on a volume the pod template mounts and PYTHONPATH names);
- ``FILE.py:function``: one Python file, loaded as a module of its own: a path in the stage pod, a
  ``file:///`` URI, or an ``s3://`` URI read from the pipeline's storage with the stage's credentials.

Sandbox boundary: there is none beyond the pod. The function runs in the stage's rank processes, with their
rights (the pod's filesystem, its network, the storage credentials in its environment); kuberlhf does not
isolate it. Treat a reward function like the trainer image itself: run only code you trust. What kuberlhf does
enforce: each call has a time limit (``rewardTimeoutSeconds``), and a call that raises, runs over, or returns
anything but a finite number fails the stage at once with an error naming the function (a user error: exit 78,
never retried).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

FIELD = "spec.stages.grpo.rewardFunction"
RewardFn = Callable[[str, str], Any]


class CodeRewardError(ValueError):
    """The reward function cannot be loaded, or a call failed; the message names the field and the function."""


def split_ref(ref: str) -> tuple[str, str]:
    """``'pkg.mod:fn'`` -> ``('pkg.mod', 'fn')``; ``'s3://b/k/r.py:fn'`` -> ``('s3://b/k/r.py', 'fn')``."""
    source, sep, attr = ref.rpartition(":")
    if not sep or not source or not attr.isidentifier():
        raise CodeRewardError(f"{FIELD}={ref!r}: write 'module:function' or 'FILE.py:function'")
    return source, attr


def is_file_source(source: str) -> bool:
    return source.endswith(".py")


def _local_path(source: str) -> Path:
    return Path(os.path.expanduser(source[len("file://"):] if source.startswith("file://") else source))


def _fetch(source: str, storage: Any) -> Path:
    """The file of a ``FILE.py`` source on this machine (an s3:// one downloaded next to the stage's cache)."""
    if not source.startswith("s3://"):
        return _local_path(source)
    from kuberlhf.storage import ObjectStore

    if storage is None:
        raise CodeRewardError(f"{FIELD}: {source} is in S3, and no storage settings were given to read it")
    data = ObjectStore.from_spec(storage).get_bytes(source)
    target = Path(tempfile.gettempdir()) / "kuberlhf-rewards" / hashlib.sha256(data).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    path = target / Path(source).name
    path.write_bytes(data)
    return path


def load_reward_function(ref: str, storage: Any = None) -> RewardFn:
    """The function ``ref`` names (see the module docstring); errors name the field, the function and the fix."""
    source, attr = split_ref(ref)
    try:
        if is_file_source(source):
            path = _fetch(source, storage)
            if not path.is_file():
                raise CodeRewardError(f"{FIELD}={ref!r}: {path} does not exist here; give a path inside the stage "
                                      "pod, a file:/// URI or an s3:// URI in spec.storage")
            name = "kuberlhf_reward_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(source)
    except CodeRewardError:
        raise
    except Exception as e:  # an ImportError, or the module's own code failing on import
        raise CodeRewardError(f"{FIELD}={ref!r}: cannot import {source!r} ({type(e).__name__}: {e}); put the "
                              "module on the trainer image's PYTHONPATH or fix its code") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CodeRewardError(f"{FIELD}={ref!r}: {source!r} has no function {attr!r}")
    return fn


def reward_function_problem(ref: str, storage: Any, local: bool) -> tuple[str, str] | None:
    """(message, fix) of a rewardFunction that cannot be used, for the preflight. Everywhere: the shape. With
    ``local`` (this machine runs the stage): that a module or local file imports and names a function (an
    s3:// file is read by the stage itself, which refuses it the same way before loading any model)."""
    try:
        source, _ = split_ref(ref)
        if source.startswith("s3://"):
            from kuberlhf.contract.preflight import uri_problem

            bad = uri_problem(source, FIELD, "reward function file")
            return (bad.message, bad.fix) if bad else None
        if local:
            load_reward_function(ref, storage)
    except CodeRewardError as e:
        return str(e).split(": ", 1)[-1], "give 'module:function' importable in the trainer image, or FILE.py:function"
    return None


def _call_with_timeout(fn: RewardFn, args: tuple[str, str], timeout: float) -> Any:
    """``fn(*args)`` in a helper thread, waiting at most ``timeout`` seconds. A call that runs over keeps running
    in its (daemon) thread, but the stage fails at once and its process ends, which stops it."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported to the caller, whatever it is
            box["error"] = e

    thread = threading.Thread(target=target, name="kuberlhf-reward", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"did not return within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class CodeReward:
    """Scores (prompt, answer) pairs with a reward function: ``CodeReward.load(ref)(prompts, answers)``."""

    def __init__(self, fn: RewardFn, name: str, timeout_s: float = 10.0):
        self.fn, self.name, self.timeout_s = fn, name, timeout_s

    @classmethod
    def load(cls, ref: str, storage: Any = None, timeout_s: float = 10.0) -> CodeReward:
        return cls(load_reward_function(ref, storage), ref, timeout_s)

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        out: list[float] = []
        for prompt, answer in zip(prompts, answers, strict=True):
            try:
                value = _call_with_timeout(self.fn, (prompt, answer), self.timeout_s)
            except Exception as e:
                raise CodeRewardError(f"{FIELD} {self.name}: {type(e).__name__}: {e} (scoring answer "
                                      f"{answer[:80]!r}); fix the function or raise "
                                      "spec.stages.grpo.rewardTimeoutSeconds") from None
            # bool is an int to Python, and a yes/no verdict is a fine reward; strings, None, tensors are not
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise CodeRewardError(f"{FIELD} {self.name}: returned {value!r} ({type(value).__name__}) for answer "
                                      f"{answer[:80]!r}; it must return a finite number")
            out.append(float(value))
        return out
