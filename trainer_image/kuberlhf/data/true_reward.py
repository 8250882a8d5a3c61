"""``spec.data.trueReward``: the programmatic preference a synthetic dataset was made from, for reporting only
(the reward model and PPO never see it). Pure helpers; the function is imported by name."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

TrueReward = Callable[[str, str], float]
FIELD = "spec.data.trueReward"


def load_true_reward(ref: str | None) -> TrueReward | None:
    """``'module:function'`` -> the function, ``None`` -> ``None``; errors name the field and the fix."""
    if not ref:
        return None
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{FIELD}={ref!r}: cannot import module {module_name!r} ({e}); put it on the stage "
            f"image's PYTHONPATH or unset the field"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{FIELD}={ref!r}: module {module_name!r} has no function {attr!r}")
    return fn


def true_rewards(fn: TrueReward, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """``fn`` of each (prompt, answer); a value outside [0, 1] or not a number is the function's bug, named."""
    out: list[float] = []
    for p, a in zip(prompts, answers, strict=True):
        v = float(fn(p, a))
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{FIELD}: returned {v!r} for answer {a!r}; it must return a number in [0, 1]")
        out.append(v)
    return out
